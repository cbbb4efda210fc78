"""Private pages: TDH.MEM.PAGE.ADD (2), AUG (6), REMOVE (29), DEMOTE (15), PROMOTE (23).

Each handler follows intel/tdx-module src/vmm_dispatcher/api_calls/tdh_mem_page_*.c; the
Dynamic PAMT parts of DEMOTE/PROMOTE follow the DPAMT-capable module source
(tdh_mem_page_demote.c + pamt_manager.c pamt_demote()/pamt_promote(), intel/tdx-module commit
1666adc4): with DPAMT a 2MB guest page is split by installing the caller's page pair
(R12/R13) as the range's 4KB PAMT level; each pair page is PAMT-walked with a SHARED lock on
the 2MB entry of the range holding it -- the lock that collides with TDH.PHYMEM.PAMT.ADD.
"""

from __future__ import annotations

from vtdx.abi import status as st
from vtdx.abi.leaves import Leaf
from vtdx.abi.regs import Regs
from vtdx.module import sept as S
from vtdx.module import td_engine
from vtdx.module.context import CallContext, LeafSpec
from vtdx.module.errors import fail
from vtdx.module.helpers import (
    EX,
    SH,
    check_and_lock_dpamt_pair,
    check_and_lock_explicit_private_hpa,
    check_and_lock_free_range_hpa,
    check_blocked_and_tracked,
    check_gpa_validity,
    check_state_map_tdcs_and_lock,
    hpa_check_with_pwr_2_alignment,
    is_tlb_tracked,
    lock_gpa_entry,
    septe_error,
    sha_block,
    shared_hpa_check_with_pwr_2_alignment,
    td_handle,
    tlb_tracking_required,
    verify_page_info_input,
)
from vtdx.module.pamt import LEVEL_2M, LEVEL_4K, PAGE_4K, PT_EPT, PT_NDA, PT_REG, pamt_key


def tdh_mem_page_add(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.PAGE.ADD(RCX = GPA | level, RDX = TDR, R8 = page HPA, R9 = source HPA)."""
    rcx, rdx, page_pa, src_pa = inp.rcx, inp.rdx, inp.r8, inp.r9
    out.rcx = out.rdx = 0
    td = td_handle(ctx, rdx, EX)
    check_state_map_tdcs_and_lock(ctx, td, None, Leaf.TDH_MEM_PAGE_ADD)
    gpa, level = verify_page_info_input(rcx, 0, 0)
    if not check_gpa_validity(td, gpa):
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RCX)
    assert td.sept is not None
    w = td.sept.walk(gpa, 0)
    if w.level != 0:
        raise septe_error(st.TDX_EPT_WALK_FAILED, st.OPERAND_ID_RCX, w)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_ADD]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    code = shared_hpa_check_with_pwr_2_alignment(ctx, src_pa, PAGE_4K, PAGE_4K)
    if code:
        raise fail(code, st.OPERAND_ID_R9)
    check_and_lock_explicit_private_hpa(ctx, page_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    ctx.checkpoint("locked")
    mem = ctx.module.memory
    mem.write(page_pa, mem.read(src_pa & ~ctx.module.hkid_mask, PAGE_4K))
    w.entry.state, w.entry.hpa = S.MAPPED, page_pa
    td.mrtd_ctx.update(sha_block(b"MEM.PAGE.ADD", gpa))
    pamt = ctx.gd.pamt
    pamt.set(page_pa, LEVEL_4K, PT_REG, td.tdr_pa)
    pamt.inc_page_count(page_pa)
    td.chldcnt += 1
    td_engine.sept_changed(td, "ADD", gpa, level)


def tdh_mem_page_aug(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.PAGE.AUG(RCX = GPA | level, RDX = TDR, R8 = page HPA): a PENDING page."""
    rcx, rdx, page_pa = inp.rcx, inp.rdx, inp.r8
    out.rcx = out.rdx = 0
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_AUG, 0, 1, SH)
    if w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_AUG]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    check_and_lock_free_range_hpa(ctx, page_pa, st.OPERAND_ID_R8, level)
    ctx.checkpoint("locked")
    ctx.module.memory.zero(page_pa, S.level_size(level))
    w.entry.state, w.entry.hpa = S.PENDING, page_pa
    pamt = ctx.gd.pamt
    pamt.set(page_pa, level, PT_REG, td.tdr_pa)
    if level == LEVEL_4K:
        pamt.inc_page_count(page_pa)
    td.chldcnt += 1 << (9 * level)
    td_engine.sept_changed(td, "AUG", rcx & ~0xFFF, level)


def tdh_mem_page_remove(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.PAGE.REMOVE(RCX = GPA | level, RDX = TDR) -> RCX = removed page HPA."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_REMOVE, 0, 2, SH)
    if not w.entry.is_leaf or w.entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_REMOVE]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    page_pa = w.entry.hpa
    if not ctx.try_lock(pamt_key(level, page_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    check_blocked_and_tracked(ctx, td, w, page_pa, level)
    ctx.checkpoint("locked")
    w.entry.state, w.entry.hpa = S.FREE, 0
    td.chldcnt -= 1 << (9 * level)
    pamt = ctx.gd.pamt
    pamt.set(page_pa, level, PT_NDA)
    if level == LEVEL_4K:
        pamt.dec_page_count(page_pa)
    out.rcx = page_pa
    td_engine.sept_changed(td, "REMOVE", rcx & ~0xFFF, level)


def tdh_mem_page_demote(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.PAGE.DEMOTE(RCX = GPA | level, RDX = TDR, R8 = new S-EPT page,
    R12/R13 = Dynamic PAMT page pair when DPAMT is on and a 2MB page is split)."""
    rcx, rdx, sept_pa, hpa0, hpa1 = inp.rcx, inp.rdx, inp.r8, inp.r12, inp.r13
    out.rcx = out.rdx = 0
    # RDX is a td_handle_and_flags_t: bit 0 (L2_SEPT_ADD_MODE) only selects which L2 S-EPT
    # pages are needed, and the model has no L2 VM (tdh_mem_page_demote.c 119-124).
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_DEMOTE, 1, 2, SH,
                                  handle_flags=True)
    entry = w.entry
    if entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_DEMOTE]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    page_pa = entry.hpa
    check_blocked_and_tracked(ctx, td, w, page_pa, level)
    # Step 2: the new S-EPT page
    check_and_lock_explicit_private_hpa(ctx, sept_pa, st.OPERAND_ID_R8, EX, PT_NDA)
    # Step 4: pamt_demote -- exclusive lock on the demoted page's PAMT entry ...
    if not ctx.try_lock(pamt_key(level, page_pa), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    pamt = ctx.gd.pamt
    dpamt = pamt.dynamic and level == LEVEL_2M
    if dpamt:
        # ... then the DPAMT pair: address checks, PAMT blocks, shared walks, bitmap.
        if not hpa_check_with_pwr_2_alignment(ctx, hpa0, PAGE_4K):
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R12)
        if not hpa_check_with_pwr_2_alignment(ctx, hpa1, PAGE_4K):
            raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_R13)
        if not pamt.block_ready(hpa0):
            raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, st.OPERAND_ID_R12)
        if not pamt.block_ready(hpa1):
            raise fail(st.TDX_OPERAND_ADDR_RANGE_ERROR, st.OPERAND_ID_R13)
        check_and_lock_dpamt_pair(ctx, hpa0, st.OPERAND_ID_R12, hpa1, st.OPERAND_ID_R13)
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
    for i in range(S.ENTRIES_PER_PAGE):
        pamt.set(page_pa + i * child_size, child_level, PT_REG, owner)
    if dpamt:
        pamt.add_node(page_pa, hpa0, hpa1, S.ENTRIES_PER_PAGE)
        ctx.module.memory.zero(hpa0, PAGE_4K)
        ctx.module.memory.zero(hpa1, PAGE_4K)
    else:
        pamt.set(page_pa, level, PT_NDA)
    entry.state, entry.hpa = S.NL_MAPPED, sept_pa
    pamt.set(sept_pa, LEVEL_4K, PT_EPT, owner)
    pamt.inc_page_count(sept_pa)
    td.chldcnt += 1
    td_engine.sept_changed(td, "DEMOTE", rcx & ~0xFFF, level)


def tdh_mem_page_promote(ctx: CallContext, inp: Regs, out: Regs) -> None:
    """TDH.MEM.PAGE.PROMOTE(RCX = GPA | level, RDX = TDR): merge 512 blocked-and-tracked
    leaves back into one; RCX = freed S-EPT page, with DPAMT RDX/R8 = freed PAMT pair."""
    rcx, rdx = inp.rcx, inp.rdx
    out.rcx = out.rdx = 0
    if ctx.version > 1:  # tdh_mem_page_promote.c 216-220; version 1 only adds L2 aliases
        raise fail(st.TDX_OPERAND_INVALID, st.OPERAND_ID_RAX)
    td, level, w = lock_gpa_entry(ctx, rcx, rdx, Leaf.TDH_MEM_PAGE_PROMOTE, 1, 2, SH)
    entry = w.entry
    if entry.state not in S.SEAMCALL_ALLOWED[Leaf.TDH_MEM_PAGE_PROMOTE]:
        raise septe_error(st.TDX_EPT_ENTRY_STATE_INCORRECT, st.OPERAND_ID_RCX, w)
    if not ctx.try_lock(pamt_key(LEVEL_4K, entry.hpa), EX):  # the S-EPT page to be merged
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    if tlb_tracking_required(td, entry.state) and entry.state != S.NL_BLOCKED:
        raise septe_error(st.TDX_GPA_RANGE_NOT_BLOCKED, st.OPERAND_ID_RCX, w)
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
    pamt = ctx.gd.pamt
    if tlb_tracking_required(td, entry.state):
        if not is_tlb_tracked(td, pamt.get(entry.hpa, LEVEL_4K).bepoch):
            raise fail(st.TDX_TLB_TRACKING_NOT_DONE, st.OPERAND_ID_RCX)
    if not ctx.try_lock(pamt_key(level, base), EX):
        raise fail(st.TDX_OPERAND_BUSY, st.OPERAND_ID_RCX)
    ctx.checkpoint("locked")
    for i in range(S.ENTRIES_PER_PAGE):
        pamt.set(base + i * child_size, level - 1, PT_NDA)
    node = pamt.remove_node(base) if (pamt.dynamic and level == LEVEL_2M) else None
    if node is not None:
        out.rdx, out.r8 = node.hpa0, node.hpa1
    pamt.set(base, level, PT_REG, td.tdr_pa)
    removed = entry.hpa
    td.sept.remove_page(removed)
    entry.state, entry.hpa = S.unblock(state), base
    pamt.set(removed, LEVEL_4K, PT_NDA)
    pamt.dec_page_count(removed)
    td.chldcnt -= 1
    out.rcx = removed
    td_engine.sept_changed(td, "PROMOTE", rcx & ~0xFFF, level)


LEAVES = [
    LeafSpec(Leaf.TDH_MEM_PAGE_ADD, tdh_mem_page_add),
    LeafSpec(Leaf.TDH_MEM_PAGE_AUG, tdh_mem_page_aug),
    LeafSpec(Leaf.TDH_MEM_PAGE_REMOVE, tdh_mem_page_remove),
    LeafSpec(Leaf.TDH_MEM_PAGE_DEMOTE, tdh_mem_page_demote),
    LeafSpec(Leaf.TDH_MEM_PAGE_PROMOTE, tdh_mem_page_promote),
]
