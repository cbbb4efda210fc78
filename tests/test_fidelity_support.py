"""Shared set-up for tests/test_fidelity_*.py (no tests here): a module of a given generation
brought up as Linux does it, a KVM-like host, and a runnable TD with one vCPU on LP 0.

Expected statuses in those tests come from intel/tdx-module: the 1.5 tree (tag TDX_1.5.01,
whose line numbers the tests cite, and 1.5.06 = commit 1e636985 where 1.5.06 differs) and the
Dynamic PAMT tree 2.0.08 (commit 1666adc4), file and lines named per test.
"""

from __future__ import annotations

from dataclasses import dataclass

from test_td_support import World, make_world

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.testing.td_host import Td, Vcpu, td_params

ALL_ONES = (1 << 64) - 1
GENERATIONS = ("1.5", "dpamt")


@dataclass
class Fx:
    w: World
    td: Td
    vcpu: Vcpu

    @property
    def m(self):  # noqa: ANN201 (TdxModule)
        return self.w.module

    def call(self, leaf: int, lp: int = 0, version: int = 0, **regs: int) -> Regs:
        return self.m.seamcall(lp, Regs(rax=int(leaf) | (version << 16), **regs))

    def rax(self, leaf: int, lp: int = 0, version: int = 0, **regs: int) -> int:
        return self.call(leaf, lp, version, **regs).rax

    def vp_rd(self, fid: int, lp: int = 0, version: int = 0, vcpu: Vcpu | None = None) -> Regs:
        v = vcpu or self.vcpu
        return self.call(Leaf.TDH_VP_RD, lp, version, rcx=v.tdvpr, rdx=fid)

    def vp_wr(self, fid: int, value: int, mask: int = ALL_ONES, lp: int = 0,
              vcpu: Vcpu | None = None) -> Regs:
        v = vcpu or self.vcpu
        return self.call(Leaf.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=fid, r8=value, r9=mask)

    def mng_rd(self, fid: int, version: int = 0) -> Regs:
        return self.call(Leaf.TDH_MNG_RD, 0, version, rcx=self.td.tdr, rdx=fid)

    def mng_wr(self, fid: int, value: int, mask: int = ALL_ONES) -> Regs:
        return self.call(Leaf.TDH_MNG_WR, rcx=self.td.tdr, rdx=fid, r8=value, r9=mask)

    def sys_rd(self, fid: int) -> Regs:
        return self.call(Leaf.TDH_SYS_RD, rdx=fid)

    def bare_vcpu(self, addcx: int | None = None) -> Vcpu:
        """VP.CREATE plus ``addcx`` TDVPX pages (default: all), no VP.INIT."""
        h = self.w.host
        v = Vcpu(h.control_page(), [], 0)
        h.call(0, Leaf.TDH_VP_CREATE, rcx=v.tdvpr, rdx=self.td.tdr)
        n = self.m.min_tdvps - 1 if addcx is None else addcx
        for _ in range(n):
            pa = h.control_page()
            h.call(0, Leaf.TDH_VP_ADDCX, rcx=pa, rdx=v.tdvpr)
            v.tdvpx.append(pa)
        return v


def fixture(generation: str = "1.5", *, debug: bool = False, runnable: bool = True,
            max_vcpus: int = 4) -> Fx:
    w = make_world(dpamt=generation == "dpamt", generation=generation)
    h = w.host
    attributes = (1 << 28) | (1 if debug else 0)
    td = h.init_vm(w.module.profile.tdx_keyid_start + 1,
                   td_params(attributes=attributes, max_vcpus=max_vcpus))
    vcpu = h.init_vcpu(td, 0, 0)
    if runnable:
        h.add_page(td, 0x1000, b"x")
        h.finalize(td)
    return Fx(w, td, vcpu)


def decode(status: int) -> str:
    return st.decode(status)
