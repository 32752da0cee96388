"""Ports and addresses (pgkd.net), with generated input: every port 1-65535 is taken as itself, anything
else is refused with one line, never wrapped; the URL parsers that hold a port (the student client's
`--url`, the teacher's `--teacher`) agree with it. Nothing here opens a socket."""
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pgkd.errors import UserError
from pgkd.net import parse_port
from pgkd.serving.client import Endpoint
from pgkd.teachers.transports import TeacherURL

PORTS = st.integers(1, 65535)
NOT_PORTS = st.integers().filter(lambda n: not 1 <= n <= 65535)
# What a port's text may be made of, and what it must not be mistaken for: signs, hex, exponents, spaces,
# digits of other scripts (Arabic-Indic, full-width, superscript) that int() and str.isdigit() take.
PORT_CHARACTERS = st.sampled_from(list("0123456789 +-.xeE_\t") + ["٣", "５", "²", "\u00a0"])
PORT_TEXTS = st.text(PORT_CHARACTERS, max_size=8)
# Hosts as a URL writes them, and as the parsed address holds them.
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "localhost", "[::1]": "[::1]", "student-server": "student-server"}


def a_port(text: str) -> bool:
    """The one definition the parsers must agree with: ASCII decimal digits, nothing else (no sign, no
    space), whose value is 1-65535."""
    return re.fullmatch(r"[0-9]{1,5}", text) is not None and 1 <= int(text) <= 65535


def refused(call, *args) -> str:
    with pytest.raises(UserError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message and message
    return message


@settings(max_examples=300)
@given(PORTS)
@example(1)
@example(65535)
def test_every_port_and_its_text_is_taken_as_itself(port):
    assert parse_port(port, "p") == port
    assert parse_port(str(port), "p") == port
    assert parse_port(str(parse_port(str(port), "p")), "p") == port


@settings(max_examples=200)
@given(NOT_PORTS)
@example(0)
@example(-1)
@example(65536)
@example(99999)
@example(70000)
def test_a_number_outside_1_to_65535_is_refused_not_wrapped(number):
    for value in (number, str(number)):
        assert "not a port (a whole number from 1 to 65535)" in refused(parse_port, value, "p")


@settings(max_examples=100)
@given(st.floats(allow_nan=True, allow_infinity=True))
@example(80.0)
def test_a_float_is_refused(number):
    refused(parse_port, number, "p")


@settings(max_examples=300)
@given(PORT_TEXTS)
@example("")
@example(" ")
@example(" 80")
@example("80\n")
@example("8 0")
@example("٣")
@example("８０")
@example("+80")
@example("-80")
@example("0x50")
@example("80.0")
@example("1e3")
@example("8_0")
@example("000080")
def test_text_is_a_port_only_when_it_is_ascii_digits_in_range(text):
    if a_port(text):
        assert parse_port(text, "p") == int(text)
    else:
        assert refused(parse_port, text, "PGKD_X").startswith(f"PGKD_X {text!r}: not a port")


@pytest.mark.parametrize("value", [None, True, False, b"80", [80], 80j])
def test_what_is_not_an_int_or_text_is_refused(value):
    refused(parse_port, value, "p")


def test_an_environment_variable_is_named_in_its_refusal():
    from pgkd.settings import ServiceSettings, read
    assert read(ServiceSettings, {}).metrics_port == 9100
    assert read(ServiceSettings, {"PGKD_METRICS_PORT": ""}).metrics_port == 9100
    assert read(ServiceSettings, {"PGKD_METRICS_PORT": "9200"}).metrics_port == 9200
    with pytest.raises(UserError, match=r"^PGKD_METRICS_PORT='abc': .*not a port"):
        read(ServiceSettings, {"PGKD_METRICS_PORT": "abc"})


# -- the URLs that hold a port ----------------------------------------------------------------------------

@settings(max_examples=300)
@given(st.sampled_from(["http", "grpc"]), st.sampled_from(sorted(HOSTS)), st.integers(-10, 10**6) | PORT_TEXTS)
@example("grpc", "127.0.0.1", 99999)
@example("http", "127.0.0.1", 99999)
@example("http", "127.0.0.1", 0)
@example("grpc", "[::1]", "٣")
def test_the_student_url_takes_a_port_only_in_1_to_65535(scheme, host, port):
    url = f"{scheme}://{host}:{port}"
    if a_port(str(port)):
        endpoint = Endpoint.parse(url)
        assert (endpoint.protocol, endpoint.address) == (scheme, f"{HOSTS[host]}:{int(port)}")
    else:
        assert refused(Endpoint.parse, url).startswith(f"url={url!r}")     # `--url URL` on the command line


@settings(max_examples=300)
@given(st.sampled_from(["triton", "triton+grpc", "openai", "openai+https"]), st.sampled_from(sorted(HOSTS)),
       st.integers(-10, 10**6) | PORT_TEXTS)
@example("triton", "127.0.0.1", 99999)
@example("triton+grpc", "127.0.0.1", 0)
@example("openai", "localhost", "+80")
@example("openai+https", "[::1]", "٣")
def test_a_teacher_url_takes_a_port_only_in_1_to_65535(scheme, host, port):
    url = f"{scheme}://{host}:{port}/" + ("teacher" if scheme.startswith("triton") else "v1?model=m")
    if a_port(str(port)):
        parsed = TeacherURL.parse(url)
        assert (parsed.port, parsed.address) == (int(port), f"{HOSTS[host]}:{int(port)}")
    else:
        assert refused(TeacherURL.parse, url).startswith(f"teacher={url!r}")   # `--teacher URL` on a command


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:99999", "http://127.0.0.1:99999", "http://127.0.0.1:0",
                                 "grpc://127.0.0.1:-1"])
def test_classify_refuses_a_port_outside_1_to_65535_in_one_line(capsys, url):
    from pgkd.cli import main
    assert main(["classify", "--url", url, "some text"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"pgkd: error: --url {url}: port ") and "not a port" in err


@pytest.mark.parametrize("url, port", [("openai+https://api.example.com/v1?model=m", 443),
                                       ("openai://127.0.0.1/v1?model=m", 8000), ("triton://h/teacher", 8000),
                                       ("triton+grpc://h/teacher", 8001), ("openai+https://h:8443/v1?model=m", 8443)])
def test_a_teacher_url_without_a_port_means_its_schemes(url, port):
    assert TeacherURL.parse(url).port == port


@pytest.mark.parametrize("host", ["::1", "::", "fe80::1"])
def test_an_ipv6_address_is_refused_for_a_triton_server_in_one_line(host):
    """tritonserver binds neither HTTP nor gRPC on `::1`, then says the port is in use (a reviewer's)."""
    from pgkd.net import triton_host
    with pytest.raises(UserError, match="Triton listens on IPv4 addresses only"):
        triton_host(host)
    assert [triton_host(h) for h in ("127.0.0.1", "0.0.0.0", "localhost")] == ["127.0.0.1", "0.0.0.0", "127.0.0.1"]
    with pytest.raises(UserError, match="no IPv4 address for it"):      # tritonserver resolves no name itself
        triton_host("no-such-host.invalid")
