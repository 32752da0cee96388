"""The one error boundary, `pgkd.cli.main`: every command's failure is one line on stderr, exit 2 for
the user's input (UserError and its kinds), exit 1 for the environment (EnvironmentFailure and its kinds,
TimeoutError), and never a traceback. Commands raise; none prints its own failure and returns a code."""
import pytest

import pgkd.cli
from pgkd.artifacts import DamagedRecord, NotInStore, StoreUnwritable
from pgkd.errors import EnvironmentFailure, Option, UserError
from pgkd.names import UnsafeName
from pgkd.serving.client import ServerUnreachable, ServingError
from pgkd_services.runtime import CannotServe


@pytest.mark.parametrize("error, code", [
    (UserError("data/x.csv:3: no label"), 2),
    (UserError(Option("labeled", 5), " is larger than the train split"), 2),
    (UnsafeName("run id '../x': not a name"), 2),
    (DamagedRecord("runs/a/state.json", "not JSON"), 2),
    (NotInStore("s3://elsewhere/x: not in this artifact store"), 2),
    (EnvironmentFailure("something outside pgkd failed"), 1),
    (StoreUnwritable("artifact store file:///s: cannot write x (Permission denied)"), 1),
    (ServingError("http://127.0.0.1:8000: no answer within the timeout of 5 s"), 1),
    (ServerUnreachable("http://127.0.0.1:8000: nothing answers"), 1),
    (CannotServe("trainer: PGKD_METRICS_PORT=9100: port 9100 is in use"), 1),
    (TimeoutError("no answer in 60 s"), 1),
    (OSError(28, "No space left on device", "runs/x/report.json"), 1),
])
def test_each_failure_is_one_line_and_its_exit_code(error, code, monkeypatch, capsys):
    def command(args):
        raise error
    monkeypatch.setattr(pgkd.cli, "cmd_predict", command)
    assert pgkd.cli.main(["predict", "--model", "m", "a text"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(error).split(":")[0] in err or "--labeled 5" in err or "No space left" in err


def test_a_parameter_is_named_as_the_commands_option_on_the_command_line(monkeypatch, capsys):
    def command(args):
        raise UserError(Option("device", "tpu"), ": not a device here")
    monkeypatch.setattr(pgkd.cli, "cmd_predict", command)
    assert pgkd.cli.main(["predict", "--model", "m", "a text"]) == 2
    assert "--device tpu: not a device here" in capsys.readouterr().err
    assert str(UserError(Option("device", "tpu"), ": x")) == "device='tpu': x"
