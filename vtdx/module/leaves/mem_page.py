"""Private pages: TDH.MEM.PAGE.ADD (2), AUG (6), REMOVE (29), DEMOTE (15), PROMOTE (23).

Each handler follows intel/tdx-module src/vmm_dispatcher/api_calls/tdh_mem_page_*.c; the
Dynamic PAMT parts of DEMOTE/PROMOTE follow the DPAMT-capable module source
(tdh_mem_page_demote.c + pamt_manager.c pamt_demote()/pamt_promote(), intel/tdx-module commit
1666adc4): with DPAMT a 2MB guest page is split by installing the caller's page pair
(R12/R13) as the range's 4KB PAMT level; each pair page is PAMT-walked with a SHARED lock on
the 2MB entry of the range holding it -- the lock that collides with TDH.PHYMEM.PAMT.ADD.
"""

from __future__ import annotations

import struct
from typing import Any

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.module import sept as S
from vtdx.module.leaves.mem_sept import (
    check_blocked_and_tracked,
    lock_gpa_entry,
    td_handle,
    tracking_required,
    verify_page_info,
)
from vtdx.module.td_common import (
    EX,
    LVL_2M,
    LVL_4K,
    PT_EPT,
    PT_NDA,
    PT_PAMT,
    PT_REG,
    SH,
    DpamtNode,
    TdEnv,
    fail,
    pamt_key,
    septe_fail,
    td_leaf,
)


def _sha_block(name: bytes, gpa: int) -> bytes:
    """sha384_128B_block_t: API name (16 bytes, zero padded), GPA, zeros to 128 bytes."""
    return name.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def page_add(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.PAGE.ADD(RCX = GPA | level, RDX = TDR, R8 = page HPA, R9 = source HPA)."""
    rcx, rdx, page_pa, src_pa = regs.rcx, regs.rdx, regs.r8, regs.r9
    regs.rcx = regs.rdx = 0
    td = td_handle(env, ctx, rdx, EX)
    env.tdcs(ctx, td, None, Leaf.TDH_MEM_PAGE_ADD)
    gpa, level = verify_page_info(rcx, 0, 0)
    if not env.gpa_valid(td, gpa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    assert td.sept is not None
    w = td.sept.walk(gpa, 0)
    if w.level != 0:
        raise septe_fail(st.TDX_EPT_WALK_FAILED, st.OPERAND_ID_RCX, w)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_ADD]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    code = env.shared_hpa_check(src_pa, 4096, 4096)
    if code:
        raise fail(code, st.OPERAND_ID_R9)
    env.check_lock_private(ctx, page_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    ctx.checkpoint("locked")
    env.memory.write(page_pa, env.memory.read(src_pa & ~env.hkid_mask, 4096))
    w.entry.state, w.entry.hpa = S.MAPPED, page_pa
    td.mrtd_ctx.update(_sha_block(b"MEM.PAGE.ADD", gpa))
    env.set_entry(page_pa, LVL_4K, PT_REG, td.tdr_pa)
    env.inc_page_count(page_pa)
    td.chldcnt += 1


def page_aug(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.PAGE.AUG(RCX = GPA | level, RDX = TDR, R8 = page HPA): a PENDING page."""
    rcx, rdx, page_pa = regs.rcx, regs.rdx, regs.r8
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_AUG, 0, 1, SH)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_AUG]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    env.check_lock_free_range(ctx, page_pa, st.OPERAND_ID_R8, level)
    ctx.checkpoint("locked")
    env.memory.zero(page_pa, S.level_size(level))
    w.entry.state, w.entry.hpa = S.PENDING, page_pa
    env.set_entry(page_pa, level, PT_REG, td.tdr_pa)
    if level == LVL_4K:
        env.inc_page_count(page_pa)
    td.chldcnt += 1 << (9 * level)


def page_remove(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.PAGE.REMOVE(RCX = GPA | level, RDX = TDR) -> RCX = removed page HPA."""
    rcx, rdx = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_REMOVE, 0, 2, SH)
    if not w.entry.is_leaf or w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_REMOVE]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    page_pa = w.entry.hpa
    if not ctx.try_lock(pamt_key(level, page_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    check_blocked_and_tracked(env, td, w, page_pa, level)
    ctx.checkpoint("locked")
    w.entry.state, w.entry.hpa = S.FREE, 0
    td.chldcnt -= 1 << (9 * level)
    env.set_entry(page_pa, level, PT_NDA)
    if level == LVL_4K:
        env.dec_page_count(page_pa)
    regs.rcx = page_pa


def page_demote(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.PAGE.DEMOTE(RCX = GPA | level, RDX = TDR, R8 = new S-EPT page,
    R12/R13 = Dynamic PAMT page pair when DPAMT is on and a 2MB page is split)."""
    rcx, rdx, sept_pa, hpa0, hpa1 = regs.rcx, regs.rdx, regs.r8, regs.r12, regs.r13
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_DEMOTE, 1, 2, SH)
    entry = w.entry
    if entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_DEMOTE]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    page_pa = entry.hpa
    check_blocked_and_tracked(env, td, w, page_pa, level)
    # Step 2: the new S-EPT page
    env.check_lock_private(ctx, sept_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    # Step 4: pamt_demote -- exclusive lock on the demoted page's PAMT entry ...
    if not ctx.try_lock(pamt_key(level, page_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    dpamt = env.dpamt and level == LVL_2M
    if dpamt:
        # ... then the DPAMT pair: address checks, PAMT blocks, shared walks, bitmap.
        if not env.hpa_check(hpa0, 4096):
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R12)
        if not env.hpa_check(hpa1, 4096):
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R13)
        if not env.pamt.block_ready(hpa0):
            raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, st.OPERAND_ID_R12)
        if not env.pamt.block_ready(hpa1):
            raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, st.OPERAND_ID_R13)
        env.check_lock_pair_free(ctx, hpa0, st.OPERAND_ID_R12, hpa1, st.OPERAND_ID_R13)
    ctx.checkpoint("locked")
    # Commit: the split S-EPT page, PAMT children, parent entry -> non-leaf.
    assert td.sept is not None
    child_level = level - 1
    child_state = S.unblock(entry.state)
    child_size = S.level_size(child_level)
    new_page = td.sept.add_page(sept_pa, child_level)
    for i in range(S.ENTRIES_PER_PAGE):
        new_page.entries[i] = S.SeptEntry(child_state, page_pa + i * child_size)
    owner = td.tdr_pa
    pamt = env.pamt
    for i in range(S.ENTRIES_PER_PAGE):
        pamt.set(page_pa + i * child_size, child_level, PT_REG, owner)
    if dpamt:
        env.dp.bitmap.update((hpa0 >> 12, hpa1 >> 12))
        env.dp.nodes[page_pa >> 21] = DpamtNode(hpa0, hpa1, S.ENTRIES_PER_PAGE)
        env.memory.zero(hpa0, 4096)
        env.memory.zero(hpa1, 4096)
        pamt.set(page_pa, LVL_2M, PT_PAMT)
    else:
        pamt.set(page_pa, level, PT_NDA)
    entry.state, entry.hpa = S.NL_MAPPED, sept_pa
    env.set_entry(sept_pa, LVL_4K, PT_EPT, owner)
    env.inc_page_count(sept_pa)
    td.chldcnt += 1


def page_promote(env: TdEnv, ctx: Any, regs: Any) -> None:
    """TDH.MEM.PAGE.PROMOTE(RCX = GPA | level, RDX = TDR): merge 512 blocked-and-tracked
    leaves back into one; RCX = freed S-EPT page, with DPAMT RDX/R8 = freed PAMT pair."""
    rcx, rdx = regs.rcx, regs.rdx
    regs.rcx = regs.rdx = 0
    td, level, w = lock_gpa_entry(env, ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_PROMOTE, 1, 2, SH)
    entry = w.entry
    if entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_PROMOTE]:
        raise septe_fail(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    if not ctx.try_lock(pamt_key(LVL_4K, entry.hpa), EX):  # the S-EPT page to be merged
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    if tracking_required(td, entry.state) and entry.state != S.NL_BLOCKED:
        raise septe_fail(st.TDX_GPA_RANGE_NOT_BLOCKED, st.OPERAND_ID_RCX, w)
    assert td.sept is not None
    child = td.sept.pages[entry.hpa]
    first = child.peek(0)
    child_size = S.level_size(level - 1)
    if first is None or not first.is_leaf or first.hpa % S.level_size(level):
        raise fail(st.TDX_EPT_INVALID_PROMOTE_CONDITIONS, st.OPERAND_ID_RCX)
    base, state = first.hpa, first.state
    for i in range(S.ENTRIES_PER_PAGE):
        e = child.peek(i)
        if e is None or e.state != state or e.hpa != base + i * child_size:
            raise fail(st.TDX_EPT_INVALID_PROMOTE_CONDITIONS, st.OPERAND_ID_RCX)
    if tracking_required(td, entry.state):
        if not env.tlb_tracked(td, env.pamt.get(entry.hpa, LVL_4K).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_RCX)
    if not ctx.try_lock(pamt_key(level, base), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    pamt = env.pamt
    for i in range(S.ENTRIES_PER_PAGE):
        pamt.set(base + i * child_size, level - 1, PT_NDA)
    node = env.dp.nodes.pop(base >> 21, None) if (env.dpamt and level == LVL_2M) else None
    if node is not None:
        env.dp.bitmap.discard(node.hpa0 >> 12)
        env.dp.bitmap.discard(node.hpa1 >> 12)
        regs.rdx, regs.r8 = node.hpa0, node.hpa1
    pamt.set(base, level, PT_REG, td.tdr_pa)
    removed = entry.hpa
    td.sept.remove_page(removed)
    entry.state, entry.hpa = S.unblock(state), base
    env.set_entry(removed, LVL_4K, PT_NDA)
    env.dec_page_count(removed)
    td.chldcnt -= 1
    regs.rcx = removed


LEAVES = [
    td_leaf(Leaf.TDH_MEM_PAGE_ADD, page_add),
    td_leaf(Leaf.TDH_MEM_PAGE_AUG, page_aug),
    td_leaf(Leaf.TDH_MEM_PAGE_REMOVE, page_remove),
    td_leaf(Leaf.TDH_MEM_PAGE_DEMOTE, page_demote),
    td_leaf(Leaf.TDH_MEM_PAGE_PROMOTE, page_promote),
]
