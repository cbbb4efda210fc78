"""How long a SEAMCALL keeps its TDX locks: the overlap model, serial runs and exploration.

On hardware a SEAMCALL on one LP runs while other LPs run theirs; two calls meet on a TDX
lock when one tries it while the other holds it, and the loser gets TDX_OPERAND_BUSY. The
model runs each leaf under the module mutex, so without help two calls never overlap. A
``Timing`` says how long a call stays at its ``locked`` control point (every lock held,
nothing committed: the module's ALL_CHECKS_PASSED) while the mutex is released, so the
other LPs' calls run meanwhile -- the time the module's work takes on hardware.

* ``SERIAL``: no hold. Calls never overlap; runs are deterministic. The default of an
  in-process module (unit tests drive it from one thread).
* ``Overlap``: each call is held ``native_ns(leaf) * slowdown``. ``native_ns`` is the
  SEAMCALL transition plus the entries the leaf writes (DEMOTE initialises 512 S-EPT and 512
  PAMT entries, AUG one of each); ``slowdown`` scales it to the guest's clock, because QEMU
  TCG runs the guest's own code that much slower than a CPU does, and the ratio of time
  inside the module to time between calls is what decides how often calls meet. The
  default of a module served to a live guest (``vtdx.runtime.daemon``).
* ``Explore``: contention exploration. On top of the overlap hold, a seeded draw per call
  holds some calls at ``locked`` far longer and delays some at ``entry`` (so a later call
  of another LP overtakes them): rare interleavings become common. The draw is a function
  of (seed, LP, leaf, n) where the call is the LP's n-th of that leaf, so the same seed gives
  the same hold schedule, and a call keeps its draw when the number of other calls before it
  varies (TD entries, whose count follows the guest's wall-clock time slices). What the
  guest does with it (its own timing under TCG) is not replayed, so two runs' contention
  reports are compared as sets.

The figures are estimates (see docs/races.md): a SEAMCALL round trip costs on the order
of a microsecond on current Xeons (published SEAMCALL/SEAMRET transition measurements put
it between 0.5 and 2 us) and writing a 16-byte PAMT or 8-byte S-EPT entry a few
nanoseconds; what matters for finding races is the order of magnitude and the proportion
between leaves, both documented and switchable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from vtdx.abi.leaves import Leaf

#: SEAMCALL entry, dispatcher checks, SEAMRET (ns, native).
TRANSITION_NS = 1500
#: One PAMT or S-EPT entry written or initialised (ns, native).
ENTRY_NS = 5
#: Entries (PAMT + S-EPT) each leaf writes beyond the transition; 0 if absent.
WORK_ENTRIES: dict[int, int] = {
    Leaf.TDH_MEM_PAGE_DEMOTE: 1024,     # 512 S-EPT entries + 512 4K PAMT entries
    Leaf.TDH_MEM_PAGE_PROMOTE: 1024,    # the same, merged back
    Leaf.TDH_PHYMEM_PAMT_ADD: 512,      # a page pair's 512 4K PAMT entries
    Leaf.TDH_PHYMEM_PAMT_REMOVE: 512,
    Leaf.TDH_MEM_PAGE_AUG: 2,           # one S-EPT entry, one PAMT entry
    Leaf.TDH_MEM_PAGE_ADD: 600,         # 4 KiB copied and measured (about 512 entries)
    Leaf.TDH_MEM_SEPT_ADD: 514,         # a new S-EPT page initialised
    Leaf.TDH_MEM_PAGE_REMOVE: 2,
    Leaf.TDH_MEM_RANGE_BLOCK: 1,
    Leaf.TDH_MEM_RANGE_UNBLOCK: 1,
    Leaf.TDH_MR_EXTEND: 100,            # SHA-384 of 256 bytes
    # 1024 4K PAMT entries and their 2 2M entries per call (TDMR_4K_PAMT_INIT_COUNT in
    # intel/tdx-module tdh_sys_tdmr_init.c): 512 calls for 2 GiB, as Linux makes them.
    Leaf.TDH_SYS_TDMR_INIT: 1026,
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: 1,
}

#: Default guest slowdown of QEMU TCG against the same code on a CPU (see docs/races.md).
DEFAULT_SLOWDOWN = 50.0


def native_ns(leaf: int) -> int:
    """The estimated time ``leaf`` spends inside the module on hardware."""
    return TRANSITION_NS + ENTRY_NS * WORK_ENTRIES.get(leaf, 0)


class Timing:
    """How long a call waits at ``entry`` and at ``locked`` (seconds, 0 = not at all)."""

    name = "serial"

    def entry_delay(self, lp: int, leaf: int, ordinal: int) -> float:
        return 0.0

    def hold(self, lp: int, leaf: int, ordinal: int) -> float:
        return 0.0

    @property
    def holds(self) -> bool:
        """False if no call ever waits (the controller then needs no subscription)."""
        return False

    def describe(self) -> dict[str, object]:
        return {"mode": self.name}


#: Fully serial, deterministic runs.
SERIAL = Timing()


@dataclass(frozen=True)
class Overlap(Timing):
    """Hold each call at ``locked`` for its native time times ``slowdown``."""

    slowdown: float = DEFAULT_SLOWDOWN
    name = "overlap"

    def hold(self, lp: int, leaf: int, ordinal: int) -> float:
        return native_ns(leaf) * self.slowdown * 1e-9

    @property
    def holds(self) -> bool:
        return self.slowdown > 0

    def describe(self) -> dict[str, object]:
        return {"mode": self.name, "slowdown": self.slowdown}


@dataclass(frozen=True)
class Explore(Overlap):
    """Seeded contention exploration (see the module docstring).

    A call is held at ``locked`` for up to ``max_hold_s`` with probability ``p_hold`` and
    delayed at ``entry`` for up to ``max_delay_s`` with probability ``p_delay``, on top of
    the overlap hold.
    """

    seed: int = 0
    p_hold: float = 0.25
    max_hold_s: float = 0.02
    p_delay: float = 0.1
    max_delay_s: float = 0.005
    name = "explore"
    _cache: dict[tuple[int, int, int], tuple[float, float]] = field(
        default_factory=dict, compare=False, repr=False)

    def draw(self, lp: int, leaf: int, ordinal: int) -> tuple[float, float]:
        """(entry delay, extra hold) of one call: a pure function of the seed and the key."""
        key = (lp, leaf, ordinal)
        got = self._cache.get(key)
        if got is None:
            rng = random.Random(f"vtdx-explore:{self.seed}:{lp}:{leaf}:{ordinal}")
            delay = rng.uniform(0, self.max_delay_s) if rng.random() < self.p_delay else 0.0
            hold = rng.uniform(0, self.max_hold_s) if rng.random() < self.p_hold else 0.0
            got = (delay, hold)
            if len(self._cache) < 65536:
                self._cache[key] = got
        return got

    def entry_delay(self, lp: int, leaf: int, ordinal: int) -> float:
        return self.draw(lp, leaf, ordinal)[0]

    def hold(self, lp: int, leaf: int, ordinal: int) -> float:
        return super().hold(lp, leaf, ordinal) + self.draw(lp, leaf, ordinal)[1]

    @property
    def holds(self) -> bool:
        return True

    def describe(self) -> dict[str, object]:
        return {"mode": self.name, "slowdown": self.slowdown, "seed": self.seed,
                "p-hold": self.p_hold, "max-hold-s": self.max_hold_s,
                "p-delay": self.p_delay, "max-delay-s": self.max_delay_s}


MODES = ("serial", "overlap", "explore")


def make_timing(mode: str, *, seed: int = 0, slowdown: float = DEFAULT_SLOWDOWN) -> Timing:
    """A timing by name (``serial``, ``overlap``, ``explore``)."""
    if mode == "serial":
        return SERIAL
    if mode == "overlap":
        return Overlap(slowdown)
    if mode == "explore":
        return Explore(slowdown, seed=seed)
    raise ValueError(f"unknown timing mode {mode!r} (one of {', '.join(MODES)})")


def requested(serial: bool, contend: int | None) -> Timing | None:
    """The timing a run's options ask for (``--serial``, ``--contend SEED`` or the pytest
    marker's ``serial=``/``contend=``); None leaves the daemon's overlap default."""
    if serial:
        return SERIAL
    if contend is not None:
        return Explore(seed=contend)
    return None
