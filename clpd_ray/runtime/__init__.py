"""The Ray runtime: run, planner, executor, recovery, run directory, metrics and the actors. The only
package (with the CLI) that imports ``ray``."""
