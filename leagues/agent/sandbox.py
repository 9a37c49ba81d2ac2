"""A sandboxed Python tool: the model's code runs in a fresh interpreter with CPU-time, memory and wall-clock
limits, without network or child processes, and is killed when a limit is hit.

    python = PythonSandbox(cpu_s=5, memory_mb=512, wall_s=10)
    env = MyEnv(tools=[python.tool()])          # the model calls python(code="print(2**10)") -> "1024\n"
    text = await python.run("print(2**10)")

Where it sits: a tool for `ToolEnv`s (`leagues.agent.env`), e.g. the math-with-Python example in `examples/`.

Decisions:
- One subprocess per call (`python -I -S`: isolated mode, no site, no user environment), in a new session
  so the whole process group can be killed; its working directory is a fresh temporary directory, removed
  afterwards; its environment is empty but for `PATH`.
- Limits: CPU time by `RLIMIT_CPU` (the kernel stops the process), address space by `RLIMIT_AS`, output
  size by `RLIMIT_FSIZE` and by reading at most `max_output` characters; wall-clock time by the caller,
  who kills the process group when it runs past `wall_s` (sleeping or blocked code uses no CPU).
- No network and no child processes: before the code runs, an audit hook (which the code cannot remove)
  refuses socket connections, binds, name lookups and every way of starting a process (`subprocess`,
  `os.system`, `os.exec*`, `os.fork`, `os.posix_spawn`). This guards against mistakes and casual attempts
  of the model, not against a determined attacker (C extensions can bypass audit hooks); run untrusted
  workloads in a container or VM as well.
- The result the model reads is stdout, then stderr (a traceback), then a line saying why the run stopped
  (`[killed: wall-clock limit of 10 s]`, `[exit code 1]`), so a failure is an observation, never an
  exception in the rollout.
"""

import asyncio
import contextlib
import os
import resource
import signal
import sys
import tempfile
from dataclasses import dataclass

from leagues.agent.env import Tool, tool

_GUARD = """
import sys
def _guard(event, args):
    if event in _BLOCKED or event.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
        raise PermissionError(f"{event} is not allowed in the sandbox")
_BLOCKED = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
            "subprocess.Popen", "os.system", "os.fork", "os.forkpty", "pty.spawn"}
sys.addaudithook(_guard)
del _guard
_code = sys.stdin.read()
exec(compile(_code, "<code>", "exec"), {"__name__": "__main__"})
"""


@dataclass(kw_only=True, slots=True)
class PythonSandbox:
    cpu_s: float = 5.0
    """CPU seconds per call."""
    memory_mb: int = 512
    """Address space of the interpreter, in MiB."""
    wall_s: float = 10.0
    """Wall-clock seconds per call; past them the process group is killed."""
    max_output: int = 4000
    """Characters of stdout and of stderr kept each (the rest is cut, saying so)."""

    def __post_init__(self) -> None:
        if not (self.cpu_s > 0 and self.memory_mb >= 64 and self.wall_s > 0 and self.max_output > 0):
            raise ValueError(f"PythonSandbox: limits must be positive (memory_mb >= 64), got {self}")

    def _limits(self) -> None:  # in the child, before exec
        cpu = max(1, int(self.cpu_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory = self.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    async def run(self, code: str) -> str:
        """Run `code`; what it printed, and why it stopped when it did not end normally."""
        with tempfile.TemporaryDirectory(prefix="leagues-sandbox-") as workdir:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", _GUARD,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=workdir, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                preexec_fn=self._limits, start_new_session=True,
            )  # fmt: skip
            out, err = bytearray(), bytearray()
            readers = [
                asyncio.create_task(self._read(proc.stdout, out)),
                asyncio.create_task(self._read(proc.stderr, err)),
            ]
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(code.encode())
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), self.wall_s)
                ending = _ending(proc.returncode, self.cpu_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                ending = f"[killed: wall-clock limit of {self.wall_s:g} s]"
            await asyncio.gather(*readers)
        parts = [self._cut(bytes(out)), self._cut(bytes(err)), ending]
        return "\n".join(p for p in parts if p)

    async def _read(self, stream: asyncio.StreamReader, into: bytearray) -> None:
        """Everything the stream gives until it closes, keeping what fits the output limit."""
        while chunk := await stream.read(65536):
            if len(into) <= 4 * self.max_output:
                into += chunk

    def _cut(self, data: bytes) -> str:
        text = data.decode(errors="replace")
        if len(text) > self.max_output:
            return text[: self.max_output] + f"\n[output cut at {self.max_output} characters]"
        return text.rstrip("\n")

    def tool(self, name: str = "python") -> Tool:
        """The sandbox as a tool the model calls with `code`."""

        async def python(code: str) -> str:
            """Run Python code in a sandbox and return what it prints (use print for results).

            Args:
                code: a Python program
            """
            return await self.run(code)

        return tool(python, name=name)


def _ending(returncode: int | None, cpu_s: float) -> str:
    if returncode == 0:
        return ""
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"[killed: CPU-time limit of {cpu_s:g} s]"
    if returncode is not None and returncode < 0:
        return f"[killed by signal {-returncode}]"
    return f"[exit code {returncode}]"
