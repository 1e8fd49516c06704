"""Runs stage scripts for the tests, each as `python script.py args` would, without paying for imports each time.

A fresh Python process spends ~1.5 s importing torch before a stage does anything, and the suite runs the
stages hundreds of times. This process imports torch, numpy and sentencepiece once, then for each request
(one JSON line on stdin) forks a copy of itself; the copy points its stdin/stdout/stderr at the request's
files, takes its environment and arguments, and runs the script as __main__. The parent waits for it
(killing it past the timeout) and answers with one line: the exit status, as subprocess reports it.
The child leaves as the interpreter would (exit functions run, streams flushed, sys.exit's status)
but with os._exit, skipping the teardown of every module, which takes ~0.45 s with torch loaded.
Nothing has run a torch operation here before the fork, so no thread pool is copied half-alive.
"""
import atexit
import json
import os
import runpy
import signal
import sys
import time

import numpy  # noqa: F401  (imported once here: every fork inherits them)
import sentencepiece  # noqa: F401
import torch  # noqa: F401


def serve():
    """Answer requests until stdin closes; return (only in a forked child) the request the child must run."""
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        deadline = time.time() + req['timeout']
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.002)
        rc = None if status is None else os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({'returncode': rc}) + '\n')
        sys.stdout.flush()


req = serve()
# --- a forked child from here on: become `python script args` ---
for fd, path, flags in ((0, req['stdin'], os.O_RDONLY), (1, req['stdout'], os.O_WRONLY), (2, req['stderr'], os.O_WRONLY)):
    f = os.open(path, flags)
    os.dup2(f, fd)
    os.close(f)
# fresh text streams on the new files, as a starting interpreter makes them (the old stdin has been read from)
sys.stdin = open(0, closefd=False, encoding=sys.stdin.encoding, errors=sys.stdin.errors)
sys.stdout = open(1, 'w', closefd=False, encoding=sys.stdout.encoding, errors=sys.stdout.errors)
sys.stderr = open(2, 'w', buffering=1, closefd=False, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
os.chdir(req['cwd'])
os.environ.clear()
os.environ.update(req['env'])
script = req['argv'][0]
sys.argv = list(req['argv'])
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` puts the script's folder first
code = 0
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as e:  # as the interpreter reads sys.exit's argument
    code = 0 if e.code is None else e.code
    if not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
except BaseException:  # an uncaught exception: its traceback, status 1
    sys.excepthook(*sys.exc_info())
    code = 1
# then leave as the interpreter would, but without tearing down every module: with torch loaded
# that teardown takes ~0.45 s a run (of ~0.55), hundreds of times a suite. Exit functions
# (multiprocessing's among them) still run, and the streams are flushed.
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
