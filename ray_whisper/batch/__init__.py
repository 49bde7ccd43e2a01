"""The batch job on Ray Data: the wiring (pipeline), the CPU stage, the model stage (columns <-> the engine),
the assemble stage, which Ray a run uses (cluster), and what a run reports."""
