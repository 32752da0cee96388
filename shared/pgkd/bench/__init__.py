"""The benchmarks: quality of the arms, speed of the student, the stream."""
