"""The C toolchain, for one model's library and an ensemble's alike: the host ``gcc``, the Arm cross
compiler for each Cortex-M target, ``qemu-system-arm`` with semihosting (and ``-icount shift=0`` to
count executed instructions), and ``arm-none-eabi-size``. It builds and runs a list of C sources and
a harness; what the sources are is the caller's business."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ArtifactError

CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror")


@dataclass(frozen=True)
class Target:
    """A Cortex-M core, the flags that build for it and the QEMU machine that runs it."""

    cpu: str
    flags: tuple[str, ...]
    machine: str
    flash: tuple[int, int]  # (origin, length) of the code/const region on the QEMU machine
    ram: tuple[int, int]


TARGETS: dict[str, Target] = {
    # MPS2 AN386: Cortex-M4, 4 MB SSRAM at 0x0 for code (vectors first), 4 MB at 0x20000000 for data.
    "cortex-m4": Target("cortex-m4", ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=soft"), "mps2-an386",
                        (0x00000400, (4 << 20) - 0x400), (0x20000000, 4 << 20)),
    # MPS2 AN500: Cortex-M7, the same memory map as AN386.
    "cortex-m7": Target("cortex-m7", ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=soft"), "mps2-an500",
                        (0x00000400, (4 << 20) - 0x400), (0x20000000, 4 << 20)),
    # BBC micro:bit (nRF51822): Cortex-M0, 256 KB flash at 0x0, 16 KB RAM at 0x20000000. A Cortex-M0+
    # (RP2040) build runs there too: both are Armv6-M with the same instructions.
    "cortex-m0": Target("cortex-m0", ("-mcpu=cortex-m0", "-mthumb", "-mfloat-abi=soft"), "microbit",
                        (0x00000400, (256 << 10) - 0x400), (0x20000000, 16 << 10)),
    "cortex-m0plus": Target("cortex-m0plus", ("-mcpu=cortex-m0plus", "-mthumb", "-mfloat-abi=soft"), "microbit",
                            (0x00000400, (256 << 10) - 0x400), (0x20000000, 16 << 10)),
    # MPS3 AN547: Cortex-M55 (Helium); vectors in the ITCM at 0x0, code in the 2 MB SRAM at
    # 0x01000000, data in the DTCM at 0x20000000.
    "cortex-m55": Target("cortex-m55", ("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"), "mps3-an547",
                         (0x01000000, 2 << 20), (0x20000000, 512 << 10)),
}


def run_tool(cmd: list[str], what: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError:
        raise ArtifactError(f"{what}: {cmd[0]} is not installed (make toolchain installs it)") from None
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        raise ArtifactError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:400]}")
    return r


STARTUP = """/* Minimal Cortex-M start-up for QEMU with semihosting: vector table, .bss, exit code. */
#include <stdlib.h>
#include <string.h>
extern int main(void);
extern void initialise_monitor_handles(void);
extern char __bss_start__[], __bss_end__[], __stack_top[];
void ec_reset(void);
void ec_fault(void);
void ec_systick(void);
volatile unsigned ec_systick_wraps;
__attribute__((section(".vectors"), used)) static void (*const ec_vectors[16])(void) = {
    (void (*)(void))__stack_top, ec_reset, ec_fault, ec_fault, ec_fault, ec_fault, ec_fault,
    0, 0, 0, 0, ec_fault, ec_fault, 0, ec_fault, ec_systick};
void ec_fault(void) { exit(99); }
void ec_systick(void) { ++ec_systick_wraps; }
void ec_reset(void) {
#if defined(__ARM_FP)
    *(volatile unsigned *)0xE000ED88 |= 0xFu << 20; /* enable the FPU (CPACR) */
#endif
    memset(__bss_start__, 0, (size_t)(__bss_end__ - __bss_start__));
    initialise_monitor_handles();
    exit(main());
}
"""

LINKER = """ENTRY(ec_reset)
MEMORY {{
  VEC (rx) : ORIGIN = 0x0, LENGTH = 0x400
  FLASH (rx) : ORIGIN = {fo:#x}, LENGTH = {fl:#x}
  RAM (rwx) : ORIGIN = {ro:#x}, LENGTH = {rl:#x}
}}
SECTIONS {{
  .vectors : {{ KEEP(*(.vectors)) }} > VEC
  .text : {{ *(.text*) *(.rodata*) KEEP(*(.init)) KEEP(*(.fini)) }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  .data : {{ *(.data*) }} > RAM
  .bss (NOLOAD) : {{ __bss_start__ = .; *(.bss*) *(COMMON) . = ALIGN(8); __bss_end__ = .; }} > RAM
  end = .;
  __end__ = .;
  __stack_top = ORIGIN(RAM) + LENGTH(RAM);
}}
"""


def compile_host(dir: Path, name: str, sources: list[Path], harness: Path, libs: tuple[str, ...] = (),
                 cc: str = "gcc") -> Path:
    """Compile ``sources`` and ``harness`` for this machine with ``cc``; returns the executable."""
    exe = dir / f"{name}_host"
    run_tool([cc, *CFLAGS, "-o", str(exe), str(harness), *map(str, sources), f"-I{dir}", *libs], "host build")
    return exe


def build_elf(dir: Path, name: str, sources: list[Path], harness: Path, target: str = "cortex-m4",
              count: bool = False, libs: tuple[str, ...] = ()) -> Path:
    """Cross-compile ``sources`` and ``harness`` with arm-none-eabi-gcc for ``target`` and link them
    with a minimal start-up for QEMU; returns the ELF. With ``count`` the harness reads SysTick around
    each inference (see ``read_counts``)."""
    t = TARGETS[target]
    bdir = dir / f"build-{target}{'-count' if count else ''}"
    bdir.mkdir(exist_ok=True)
    (bdir / "startup.c").write_text(STARTUP)
    (bdir / "link.ld").write_text(LINKER.format(fo=t.flash[0], fl=t.flash[1], ro=t.ram[0], rl=t.ram[1]))
    elf = bdir / f"{name}.elf"
    objs = []
    for src in [*sources, harness, bdir / "startup.c"]:
        obj = bdir / (src.stem + ".o")
        std = CFLAGS if src.name != "startup.c" else ("-std=gnu99", "-O2", "-Wall")  # start-up code is GNU C
        std = (*std, "-DEC_COUNT_INSTRUCTIONS") if count and src == harness else std
        run_tool(["arm-none-eabi-gcc", *std, "-Os", *t.flags, "-ffunction-sections", "-fdata-sections",
                  f"-I{dir}", "-c", str(src), "-o", str(obj)], f"{target} compile {src.name}")
        objs.append(obj)
    run_tool(["arm-none-eabi-gcc", *t.flags, "--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections",
              f"-T{bdir / 'link.ld'}", "-o", str(elf), *map(str, objs), *libs, "-lc", "-lrdimon"], f"{target} link")
    return elf


def qemu(elf: Path, target: str, timeout: float, icount: bool = False) -> str:
    t = TARGETS[target]
    r = run_tool(["qemu-system-arm", "-M", t.machine, "-nographic", "-monitor", "none", "-serial", "none",
              *(("-icount", "shift=0") if icount else ()),
              "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)],
             f"qemu {t.machine}", timeout=timeout, stdin=subprocess.DEVNULL)
    return r.stdout


def read_counts(out: str, n_inputs: int, target: str) -> tuple[list[int], list[int], float]:
    """Instructions and SysTick ticks of each inference, and instructions per tick, from what a harness
    built with ``count`` printed under ``qemu(..., icount=True)``.

    With ``-icount shift=0`` QEMU advances its virtual clock 1 ns per executed instruction, so SysTick
    (on the processor clock) ticks once per fixed number of instructions: 40 on mps2-an386's 25 MHz.
    The harness reads SysTick around each inference and around a loop of known length (``subs``,
    ``bne``: two instructions per iteration), whose ticks give that number on every machine; the count
    is exact to one tick (plus the few instructions of the SysTick reads)."""
    cal = re.search(r"# calibration (\d+) ticks for (\d+) instructions", out)
    ticks = [int(v) for v in re.findall(r"# inference (\d+) ticks", out)]
    if cal is None or len(ticks) != n_inputs or int(cal.group(1)) == 0:
        raise ArtifactError(f"qemu {TARGETS[target].machine}: the harness printed no instruction counts "
                            "(SysTick not running under -icount?)")
    per_tick = int(cal.group(2)) / int(cal.group(1))
    return [int(round(t * per_tick)) for t in ticks], ticks, per_tick


@dataclass
class Count:
    """Instructions the model executed per inference under ``qemu-system-arm -icount shift=0``."""

    target: str
    machine: str
    outputs: np.ndarray  # int8, one row per input
    instructions: list[int]  # per inference
    ticks: list[int]  # SysTick ticks per inference
    instructions_per_tick: float  # from the calibration loop (40 on mps2-an386)

    @property
    def per_inference(self) -> int:
        return int(np.median(self.instructions))


@dataclass
class ArmSize:
    target: str
    text: int  # code and const data (flash)
    data: int  # initialised data (flash and RAM)
    bss: int  # zeroed RAM (the arena)
    kernels: int = 0  # of ``text``: the kernels' code (ec_kernels.o); the rest is the model's weights and calls

    @property
    def flash(self) -> int:
        return self.text + self.data

    @property
    def ram(self) -> int:
        return self.data + self.bss


def object_sizes(dir: Path, sources: list[Path], target: str = "cortex-m4") -> dict[str, tuple[int, int, int]]:
    """(text, data, bss) of each source's object, compiled with -Os for ``target``, by source stem, as
    ``arm-none-eabi-size`` reports them (no harness, no libc)."""
    t = TARGETS[target]
    bdir = dir / f"build-{target}"
    bdir.mkdir(exist_ok=True)
    objs = []
    for src in sources:
        obj = bdir / (src.stem + ".o")
        run_tool(["arm-none-eabi-gcc", *CFLAGS, "-Os", *t.flags, f"-I{dir}", "-c", str(src), "-o", str(obj)],
                 f"{target} compile {src.name}")
        objs.append(str(obj))
    r = run_tool(["arm-none-eabi-size", *objs], "arm-none-eabi-size")
    rows = [line.split() for line in r.stdout.strip().splitlines()[1:]]
    return {Path(v[-1]).stem: (int(v[0]), int(v[1]), int(v[2])) for v in rows}


def arm_size_of(dir: Path, sources: list[Path], target: str = "cortex-m4") -> ArmSize:
    """Flash and static RAM of a library (its objects together), and of those the kernels' code."""
    sizes = object_sizes(dir, sources, target)
    text, data, bss = (sum(v[i] for v in sizes.values()) for i in range(3))
    k = sizes["ec_kernels"]
    return ArmSize(target, text, data, bss, k[0] + k[1])


def have_toolchain() -> bool:
    return all(shutil.which(x) for x in ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"))
