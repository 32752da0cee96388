"""The teachers: the contract (a structured request in, labeled samples out), the simulations of an
LLM teacher, the LLM client and its transports, the prompt and the reading of answers, and the
shim that serves a simulation as a Triton model."""
