"""The sandboxed Python tool on real subprocesses: output comes back, and each limit (CPU time, memory, wall
clock) and each refusal (network, child processes) is what the model reads, never an exception."""

import asyncio
import time

from leagues.agent.env import ToolEnv
from leagues.agent.sandbox import PythonSandbox


def run(code: str, **limits) -> str:
    return asyncio.run(PythonSandbox(**limits).run(code))


def test_output_and_errors_are_the_observation():
    assert run("print(2**10)") == "1024"
    out = run("1/0")
    assert "ZeroDivisionError" in out and out.endswith("[exit code 1]")


def test_limits_stop_the_code():
    assert run("while True: pass", cpu_s=1, wall_s=20).endswith("[killed: CPU-time limit of 1 s]")
    start = time.monotonic()
    out = run("import time\nprint('started', flush=True)\ntime.sleep(60)", wall_s=1)
    assert out == "started\n[killed: wall-clock limit of 1 s]" and time.monotonic() - start < 10
    assert "MemoryError" in run("x = bytearray(2**31)", memory_mb=256)
    assert "[output cut at 100 characters]" in run("print('x' * 1000)", max_output=100)


def test_no_network_and_no_child_processes():
    out = run("import socket\nsocket.socket().connect(('127.0.0.1', 9))")
    assert "PermissionError: socket.connect is not allowed" in out
    assert "subprocess.Popen is not allowed" in run("import subprocess\nsubprocess.run(['true'])")
    assert "os.system is not allowed" in run("import os\nos.system('true')")


def test_the_sandbox_as_a_tool():
    env = ToolEnv([PythonSandbox(wall_s=5).tool()])
    assert env.tools[0]["function"]["parameters"]["required"] == ["code"]
    assert asyncio.run(env.call("python", '{"code": "print(6*7)"}')) == "42"
