"""State invariant checker: PAMT, TDs, S-EPT, Dynamic PAMT accounting and keyids agree.

Meant to run after every SEAMCALL in tests (and on demand from an inspector). It reads model
state only; it returns human-readable problem strings (empty list = consistent).
"""

from __future__ import annotations

from vtdx.module import TdxModule
from vtdx.module import sept as S
from vtdx.module.locks import EXCLUSIVE, LockTable
from vtdx.module.pamt import (
    LEVEL_2M,
    LEVEL_4K,
    PAGE_TYPE_NAMES,
    PT_EPT,
    PT_NDA,
    PT_PAMT,
    PT_REG,
    PT_RSVD,
    PT_TDCX,
    PT_TDR,
    PT_TDVPR,
    SHIFT,
    PamtManager,
    pamt_key,
)
from vtdx.module.state import TD_BLOCKED, TD_TEARDOWN

#: Page type names as the messages print them ("TDR", not "PT_TDR").
PT_NAMES = {pt: name.removeprefix("PT_") for pt, name in PAGE_TYPE_NAMES.items()}

def pamt_owned(module: TdxModule) -> dict[tuple[int, int], tuple[int, int]]:
    """(level, pa) -> (pt, owner) for every materialised PAMT entry that is neither free
    (PT_NDA) nor reserved: after every TD is gone, what a teardown failed to reclaim."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for level in (0, 1, 2):
        for idx, e in module.pamt.entries(level).items():
            if e.pt not in (PT_NDA, PT_RSVD):
                out[(level, idx << SHIFT[level])] = (e.pt, e.owner)
    return out


def check_invariants(module: TdxModule, *, expect_no_locks: bool = False) -> list[str]:
    """All violations found, as readable lines."""
    gd = module.gd
    problems: list[str] = []
    bad = problems.append
    owned = pamt_owned(module)
    claimed: dict[tuple[int, int], str] = {}

    def claim(level: int, pa: int, pt: int, owner: int, what: str) -> None:
        key = (level, pa)
        got = owned.get(key)
        if got != (pt, owner):
            have = "free" if got is None else f"{PT_NAMES.get(got[0], got[0])} owner {got[1]:#x}"
            bad(f"{what} at {pa:#x}: PAMT says {have}, expected {PT_NAMES[pt]} "
                f"owner {owner:#x}")
        if key in claimed:
            bad(f"{what} at {pa:#x} also used as {claimed[key]}")
        claimed[key] = what

    tds = gd.tds
    live_hkids: dict[int, int] = {}
    for tdr, td in tds.items():
        claim(LEVEL_4K, tdr, PT_TDR, 0, f"TDR {tdr:#x}")
        teardown = td.lifecycle == TD_TEARDOWN
        # chldcnt = 4KB-equivalents of every page the TD owns (PAMT owner == TDR)
        n = sum(1 << (9 * lvl) for (lvl, _), (pt, own) in owned.items()
                if own == tdr and pt != PT_TDR)
        if n != td.chldcnt:
            bad(f"TD {tdr:#x}: CHLDCNT {td.chldcnt} but PAMT has {n} pages owned")
        if td.lifecycle in (TD_BLOCKED,):
            if module.kot.get(td.hkid) != 2:
                bad(f"TD {tdr:#x} blocked but HKID {td.hkid} is not FLUSHED in the KOT")
        elif not teardown:
            if module.kot.get(td.hkid) != 1:
                bad(f"TD {tdr:#x}: HKID {td.hkid} is not ASSIGNED in the KOT")
            if td.hkid in live_hkids:
                bad(f"HKID {td.hkid} used by TDs {live_hkids[td.hkid]:#x} and {tdr:#x}")
            live_hkids[td.hkid] = tdr
        if teardown:
            continue  # pages are being reclaimed; only the ownership count above applies
        for pa in td.tdcx:
            claim(LEVEL_4K, pa, PT_TDCX, tdr, f"TDCX of {tdr:#x}")
        for v in td.vcpus.values():
            claim(LEVEL_4K, v.tdvpr_pa, PT_TDVPR, tdr, f"TDVPR of {tdr:#x}")
            for pa in v.tdvpx:
                claim(LEVEL_4K, pa, PT_TDCX, tdr, f"TDVPX of {tdr:#x}")
        if td.sept is None:
            continue
        for page in td.sept.non_root_pages():
            claim(LEVEL_4K, page.hpa, PT_EPT, tdr, f"S-EPT page (level {page.level}) of {tdr:#x}")
        for page in td.sept.pages.values():
            for idx, e in page.entries.items():
                if e.state in S.NON_LEAF_STATES:
                    child = td.sept.pages.get(e.hpa)
                    if child is None or child.level != page.level - 1:
                        bad(f"S-EPT entry {idx} of page {page.hpa:#x} points to {e.hpa:#x}, "
                            "not an S-EPT page one level down")
        for gpa, level, e in td.sept.leaves():
            if e.hpa % S.level_size(level):
                bad(f"GPA {gpa:#x}: HPA {e.hpa:#x} not aligned for level {level}")
            claim(level, e.hpa, PT_REG, tdr, f"private page GPA {gpa:#x} of {tdr:#x}")
    for key, (pt, owner) in owned.items():
        if key in claimed or pt == PT_PAMT:
            continue
        level, pa = key
        if tds.get(owner) is not None and tds[owner].lifecycle == TD_TEARDOWN:
            continue
        if pt in (PT_REG, PT_EPT, PT_TDCX, PT_TDVPR, PT_TDR):
            bad(f"PAMT {PT_NAMES.get(pt, pt)} page {pa:#x} (level {level}) owned by "
                f"{owner:#x} is not part of any TD")
    problems += _check_hierarchy(module, owned)
    if gd.pamt.dynamic:
        problems += _check_dpamt(gd.pamt, owned, module.locks)
    elif gd.pamt.nodes or gd.pamt.bitmap:
        bad("Dynamic PAMT state exists but Dynamic PAMT is off")
    if expect_no_locks and len(module.locks):
        bad(f"locks still held: {module.locks.snapshot()}")
    return problems


def _check_hierarchy(module: TdxModule, owned: dict[tuple[int, int], tuple[int, int]]) -> list[str]:
    """A 2MB/1GB leaf (PT_REG) has no assigned pages below it."""
    out = []
    for level, pa in owned:
        if level == LEVEL_4K:
            parent = owned.get((LEVEL_2M, pa & ~((1 << 21) - 1)))
            if parent is not None and parent[0] == PT_REG:
                out.append(f"4KB page {pa:#x} assigned inside the 2MB page "
                           f"{pa & ~((1 << 21) - 1):#x}")
    return out


def _being_added(hpa: int, locks: LockTable) -> bool:
    """A PAMT.ADD or DEMOTE between its pair check and its commit has set the page's bitmap
    bit (helpers.check_and_lock_dpamt_pair) and still holds the page's 4KB PAMT entry, or
    the page's 2MB range exclusive when the page lies in the range it adds."""
    return (locks.mode_of(pamt_key(LEVEL_4K, hpa)) != 0
            or locks.mode_of(pamt_key(LEVEL_2M, hpa)) == EXCLUSIVE)


def _check_dpamt(pamt: PamtManager, owned: dict[tuple[int, int], tuple[int, int]],
                 locks: LockTable) -> list[str]:
    out = []
    nodes = pamt.nodes
    users: dict[int, int] = {}
    for idx, node in nodes.items():
        rng = idx << 21
        if owned.get((LEVEL_2M, rng), (None,))[0] != PT_PAMT:
            out.append(f"DPAMT pair for {rng:#x} but its 2MB PAMT entry is not PT_PAMT")
        for hpa in (node.hpa0, node.hpa1):
            if (hpa >> 12) not in pamt.bitmap:
                out.append(f"DPAMT page {hpa:#x} of range {rng:#x} not marked in the bitmap")
            if hpa >> 12 in users:
                out.append(f"DPAMT page {hpa:#x} backs ranges {users[hpa >> 12] << 21:#x} "
                           f"and {rng:#x}")
            users[hpa >> 12] = idx
            if (LEVEL_4K, hpa) in owned or (LEVEL_2M, hpa & ~((1 << 21) - 1)) in owned and owned[
                    (LEVEL_2M, hpa & ~((1 << 21) - 1))][0] == PT_REG:
                out.append(f"DPAMT page {hpa:#x} is also assigned to a TD")
        count = sum(1 for i in range(512) if (LEVEL_4K, rng + (i << 12)) in owned)
        if count != node.page_count:
            out.append(f"DPAMT range {rng:#x}: page count {node.page_count}, "
                       f"{count} pages assigned")
    for page in pamt.bitmap:
        if page not in users and not _being_added(page << 12, locks):
            out.append(f"bitmap marks {page << 12:#x} as a PAMT page but no range uses it")
    for (level, pa), (pt, _) in owned.items():
        if level == LEVEL_2M and pt == PT_PAMT and (pa >> 21) not in nodes:
            out.append(f"2MB entry {pa:#x} is PT_PAMT without a page pair")
        if level == LEVEL_4K and (pa >> 21) not in nodes:
            out.append(f"4KB PAMT entry {pa:#x} exists without its range's DPAMT pair")
    return out


def fingerprint(module: TdxModule) -> tuple[object, ...]:
    """Everything a SEAMCALL may change, as comparable plain data (for "a failed call leaves
    state unchanged" checks)."""
    gd = module.gd
    pamt = tuple(sorted((lvl, idx, e.pt, e.owner, e.bepoch)
                        for lvl in (0, 1, 2) for idx, e in module.pamt.entries(lvl).items()))
    tds = []
    for tdr, td in sorted(gd.tds.items()):
        sept: tuple[object, ...] = ()
        if td.sept is not None:
            sept = tuple(sorted((p.hpa, p.level, tuple(sorted((i, e.state, e.hpa)
                                                             for i, e in p.entries.items()
                                                             if e.state != S.FREE)))
                                for p in td.sept.pages.values()))
        vcpus = tuple(sorted((v.tdvpr_pa, tuple(v.tdvpx), v.initialized, v.associated_lp,
                              v.x2apic_id, tuple(sorted(v.fields.items())))
                             for v in td.vcpus.values()))
        tds.append((tdr, td.hkid, td.lifecycle, td.op_state, td.chldcnt, tuple(td.tdcx),
                    td.pkg_config_bitmap, td.td_epoch, tuple(td.refcount), td.num_vcpus,
                    td.mrtd_ctx.copy().digest(), td.mrtd, td.tsc_offset,
                    tuple(sorted(td.fields.items())), sept, vcpus))
    dp = (tuple(sorted((k, n.hpa0, n.hpa1, n.page_count) for k, n in gd.pamt.nodes.items())),
          tuple(sorted(gd.pamt.bitmap)))
    kot = (tuple(sorted(gd.kot.items())),
           tuple(sorted((k, tuple(sorted(v))) for k, v in gd.kot_wbinvd.items())))
    return (pamt, tuple(tds), dp, kot)


def td_snapshot(module: TdxModule) -> dict[str, object]:
    """Plain-data view of every TD and of Dynamic PAMT, for inspectors (QMP) and logs."""
    with module.cond:
        gd = module.gd
        tds = []
        for tdr, td in sorted(gd.tds.items()):
            states: dict[str, int] = {}
            leaves = td.sept.leaves() if td.sept is not None else []
            for _, level, e in leaves:
                key = f"{S.STATE_NAMES[e.state]}/{('4K', '2M', '1G')[level]}"
                states[key] = states.get(key, 0) + 1
            tds.append({
                "tdr": tdr, "hkid": td.hkid, "lifecycle": td.lifecycle,
                "op_state": td.op_state, "chldcnt": td.chldcnt, "td_epoch": td.td_epoch,
                "num_vcpus": td.num_vcpus, "mrtd": td.mrtd.hex() if td.finalized else None,
                "sept_pages": len(td.sept.pages) if td.sept is not None else 0,
                "leaves": states,
            })
        return {
            "tds": tds,
            "dynamic_pamt": gd.pamt.dynamic,
            "dpamt_ranges": [{"range": k << 21, "hpa0": n.hpa0, "hpa1": n.hpa1,
                              "page_count": n.page_count}
                             for k, n in sorted(gd.pamt.nodes.items())],
            "dpamt_pages": len(gd.pamt.bitmap),
            "pauses": [{"lp": h.lp, "leaf": h.leaf, "point": h.point, "paused": h.paused}
                       for h in getattr(module.control, "_pauses", [])],
        }
