"""The parts of the PGKD loop: evaluation, mining, screening, stopping, the cycle's phases, the
embedded run, its report and output folder. Nothing here knows of a message bus."""
