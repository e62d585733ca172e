"""One benchmark run in a fresh interpreter, started by ``tools.bench``.

``python -m tools.bench_worker TARGET SPEC_JSON`` imports the handler the way a
Lambda cold start does, timing the import, then hands over to
``tools.bench_stream.run`` and prints its result as one JSON object on stdout.

Nothing but what the interpreter has already loaded is imported before the
timed import, so the target pays for everything it needs (json, boto3...).
"""
import importlib
import os
import sys
import time

#: target name -> (module, handler attribute), as Lambda's handler setting names them.
TARGETS = {"app": ("app", "app"), "naive": ("tools.naive_lambda", "lambda_handler")}


def main() -> None:
    # stdout carries the result; whatever the target prints goes to stderr.
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    target, spec = sys.argv[1], sys.argv[2]
    module, attribute = TARGETS[target]
    started = time.perf_counter()
    try:
        handler = getattr(importlib.import_module(module), attribute)
    except Exception as error:  # the parent shows it as this configuration's result
        handler = error
    import_s = time.perf_counter() - started
    from tools import bench_stream

    result_out.write(bench_stream.run(handler, target == "app", spec, import_s))
    result_out.close()


if __name__ == "__main__":
    main()
