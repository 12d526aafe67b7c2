"""Kill this process (SIGKILL: no cleanup code runs) at the k-th file-system call, to test crash safety at every
instant of a save. The calls counted are the ones a save is made of: os.replace / rename / fsync / unlink / mkdir /
rmdir and shutil.rmtree (pathlib's methods go through them).

    python tests/killpoints.py K LOG MODULE ARGS...   # import MODULE, then MODULE.main(ARGS), killed at call K
                                                      # (K = 0: never); every call is appended to LOG
"""
import os
import shutil
import signal
import sys

CALLS = ("replace", "rename", "fsync", "unlink", "mkdir", "rmdir")


def install(k: int, log=None) -> None:
    """Count the calls from now on; at the k-th one (k >= 1) SIGKILL this process before the call happens."""
    count = [0]

    def wrap(mod, name):
        real = getattr(mod, name)

        def call(*a, **kw):
            count[0] += 1
            if log is not None:
                log.write(f"{count[0]} {name} {a[0] if a else ''}\n")
                log.flush()
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        setattr(mod, name, call)

    for name in CALLS:
        wrap(os, name)
    wrap(shutil, "rmtree")


if __name__ == "__main__":
    k, log_path, module = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main = __import__(module).main
    with open(log_path, "a") as log:
        install(k, log)
        sys.exit(main(sys.argv[4:]))
