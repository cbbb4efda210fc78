"""What each leaf follows, what it models and what it does not: the source of
docs/conformance.md.

One ``Conformance`` per leaf number, next to nothing else, so the page is generated
(``python -m vtdx.module.conformance > docs/conformance.md``) and tests/test_conformance.py
checks that the page is current, that every leaf of the dispatcher's table is declared and
that every declaration names a source file of the tree it follows. A check is listed under
``modelled`` only when the handler makes it with the module's status and operand id;
anything else goes under ``gaps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtdx.abi.leaves import Leaf, leaf_name
from vtdx.platform.profile import GENERATIONS

#: Trees, by the short names used below.
T15 = "1.5"       # intel/tdx-module 1.5.06 (commit 1e636985); line numbers from TDX_1.5.01
T20 = "dpamt"     # intel/tdx-module 2.0.08 (commit 1666adc4)
BOTH = (T15, T20)
API = "src/vmm_dispatcher/api_calls/"
HELPERS = "src/common/helpers/helpers.c"
MD = "src/common/metadata_handlers/"

_COMMON_GAP_15 = ("the 1.5 generation follows 1.5.06 where the research compared it with "
                  "1.5.01 (dispatcher, tdh_vp_init.c, metadata_sys.c, FEATURES0); "
                  "elsewhere 1.5.01's code is assumed unchanged")


@dataclass(frozen=True)
class Conformance:
    """One leaf's conformance statement."""

    leaf: int
    #: Generations whose tree the leaf follows (``T15`` / ``T20``).
    trees: tuple[str, ...]
    #: Source files in intel/tdx-module (or a named Linux file for leaves outside it).
    files: tuple[str, ...]
    modelled: tuple[str, ...]
    gaps: tuple[str, ...] = ()


NOT_AUDITED = ("not re-read end to end against 1.5.06 / 2.0.08; the list above is what the "
               "handler states and its tests check")


C = Conformance
DECLARED: tuple[Conformance, ...] = (
    # --- platform bring-up -------------------------------------------------------------------
    C(Leaf.TDH_SYS_INIT, BOTH, (API + "tdh_sys_init.c",),
      ("RCX reserved bits -> OPERAND_INVALID|RCX after the global lock, before the state check",
       "SYS_INIT_NOT_PENDING, SYS_BUSY",
       "version 1 only in the 2.0 generation (dispatcher); version > 1 -> OPERAND_INVALID|RAX "
       "before the lock"),
      ("platform enumeration (CPUID, MSRs, SMRR, SEAM capabilities) always passes",
       "2.0.08 version 1: R8 (configure_fatal_info_diagnostics) is accepted as 0 only; other "
       "values give OPERAND_INVALID|R8 whatever the tree would accept")),
    C(Leaf.TDH_SYS_LP_INIT, BOTH, (API + "tdh_sys_lp_init.c",),
      ("state and per-LP initialisation statuses",),
      ("per-LP platform checks always pass",)),
    C(Leaf.TDH_SYS_LP_SHUTDOWN, BOTH, (API + "tdh_sys_lp_shutdown.c",),
      ("LP shutdown state",)),
    C(Leaf.TDH_SYS_CONFIG, BOTH, (API + "tdh_sys_config.c",),
      ("TDMR array checks in the module's order with the detail bytes",
       "global keyid; R8 bit 16 enables Dynamic PAMT on a profile that has it"),),
    C(Leaf.TDH_SYS_KEY_CONFIG, BOTH, (API + "tdh_sys_key_config.c",),
      ("per-package key programming; the last package -> SYS_READY",)),
    C(Leaf.TDH_SYS_TDMR_INIT, BOTH, (API + "tdh_sys_tdmr_init.c",),
      ("one 1024-entry slice per call, RDX = next address",)),
    C(Leaf.TDH_SYS_RD, BOTH, (API + "tdh_sys_rd.c", MD + "metadata_sys.c",
                              MD + "metadata_generic.c"),
      ("LP init; null id -> first id + FIRST_FIELD_ID_IN_CONTEXT",
       "md_check_as_single_element_id; match on class + field code (size code ignored)",
       "next id keeps the caller's bits within an entry, else the next entry's table id",
       "CPUID_CONFIG slots past NUM_CPUID_CONFIG read ~0 / 0 (no FIELD_SKIP)",
       "NUM_CPUID_CONFIG = MAX_NUM_CPUID_CONFIG (18, 1.5.06's cpuid_configurable); values "
       "CONFIG_DIRECT | ALLOW_DIRECT & the platform's (vtdx.module.cpuid)",
       "1.5: NUM_CMRS = MAX_CMR (32), unused CMR slots read 0",
       "version, TDX_FEATURES0, TDCS/TDVPS sizes, MAX_VCPUS_PER_TD of the generation"),
      ("the global table is vtdx's list (vtdx.abi.fields), not the auto-generated one: "
       "handoff, migration, service-TD and L2 fields and MIN_VIRT_MAXPA are missing",
       "the dpamt generation reports 1.5.06's CPUID tables (2.0.08's were not read)",
       "NUM_CMRS: MAX_CMR (32) in the 1.5 generation; the number of CMRs in the 2.0 "
       "generation (its metadata_sys.c was not read)",
       "2.0.08's TDX_FEATURES0 is taken as 1.5.06's value (its get_tdx_features_enum0 was "
       "not read); ATTRIBUTES/XFAM/CONFIG_FLAGS fixed bits are chosen for KVM 7.3")),
    C(Leaf.TDH_SYS_RDALL, BOTH, (API + "tdh_sys_rdall.c", MD + "metadata_generic.c"),
      ("LP init; RDX shared 4K HPA -> OPERAND_INVALID|RDX",
       "start id must be the first element of a field with the entry's size code",
       "sequences merge consecutive fields of one class, element count and size "
       "(md_dump_sequence); a whole field must fit; LIST_OVERFLOW with R8 = next field id"),
      ("over vtdx's global field list (see TDH.SYS.RD)",)),
    C(Leaf.TDH_SYS_SHUTDOWN, BOTH, (API + "tdh_sys_shutdown.c",),
      ("module shutdown state",)),
    C(Leaf.TDH_SYS_DISABLE, (T20,), ("Linux arch/x86/virt/vmx/tdx/tdx.c (tdx_sys_disable)",),
      ("resets the module; SYS_BUSY while other TDH.SYS calls run; enumerated by "
       "TDX_FEATURES0 bit 53",),
      ("not in any public module tree: modelled from the Linux series' description",)),
    # --- physical memory -----------------------------------------------------------------------
    C(Leaf.TDH_PHYMEM_CACHE_WB, BOTH, (API + "tdh_phymem_cache_wb.c",),
      ("KOT FLUSHED keyids of this package are written back",),
      ("never interrupted (no TDX_INTERRUPTED_RESUMABLE)",)),
    C(Leaf.TDH_PHYMEM_PAGE_RDMD, (T20,), (API + "tdh_phymem_page_rdmd.c",),
      ("page_size_api_input_t level; shared locked PAMT walk; Dynamic PAMT reporting",)),
    C(Leaf.TDH_PHYMEM_PAGE_RECLAIM, BOTH, (API + "tdh_phymem_page_reclaim.c",),
      ("exclusive PAMT walk, page type/owner/level outputs, TEARDOWN and CHLDCNT checks",)),
    C(Leaf.TDH_PHYMEM_PAGE_WBINVD, BOTH, (API + "tdh_phymem_page_wbinvd.c",),
      ("PAMT checks with operand RCX",)),
    C(Leaf.TDH_PHYMEM_PAMT_ADD, (T20,), (API + "tdh_phymem_pamt_add.c",),
      ("2MB entry exclusive, page pair checks (free, not PAMT pages, distinct); the pair's "
       "PAMT_PAGE_BITMAP bits atomically tested and set at the check, before the commit",)),
    C(Leaf.TDH_PHYMEM_PAMT_REMOVE, (T20,), (API + "tdh_phymem_pamt_remove.c",),
      ("returns the pair in RDX/R8",)),
    # --- TD management ---------------------------------------------------------------------
    C(Leaf.TDH_MNG_CREATE, BOTH, (API + "tdh_mng_create.c",),
      ("HKID range, TDR page exclusive (RCX), KOT lock, HKID_NOT_FREE",)),
    C(Leaf.TDH_MNG_KEY_CONFIG, BOTH, (API + "tdh_mng_key_config.c",),
      ("TDR exclusive, lifecycle, per-package KET lock and KEY_CONFIGURED",)),
    C(Leaf.TDH_MNG_ADDCX, BOTH, (API + "tdh_mng_add_cx.c",),
      ("TDR exclusive, lifecycle, TDCX_NUM_INCORRECT past MIN_NUM_TDCS_PAGES of the "
       "generation (6 / 9)",),
      ("no L2 VMs: the TDCS never grows past the base size",)),
    C(Leaf.TDH_MNG_INIT, BOTH, (API + "tdh_mng_init.c",),
      ("TD_PARAMS field checks with their operand ids, CPUID_CONFIG masks, TDCS page count "
       "(TDCS_NOT_ALLOCATED)",
       "read_and_set_cpuid_configurations of 1.5.06 on every cpuid_lookup slot: native "
       "values (the host's CPUID, vtdx.platform.cpuid) with FIXED0/DYNAMIC/FIXED1, "
       "CONFIG_DIRECT/ALLOW_DIRECT, F/M/S check, XFAM masks, per-leaf rules (5, 7, 0xA, "
       "0xD, 0x14, 0x15, 0x19, 0x1A, 0x1C, 0x1D, 0x23, 0x80000008); CPUID(0x1F) check and "
       "CPUID(0xB) derivation (TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)"),
      ("the host CPU (QEMU TCG max) has no leaf 0x1F: the module samples it as the host's "
       "0xB (the real module refuses TDH.SYS.INIT without it)",
       "ATTRIBUTES.MIGRATABLE and CONFIG_FLAGS.MAXPA_VIRT are never allowed, so "
       "check_fms_config and the virtual MAXPA are not modelled; IA32_TSX_CTRL is not "
       "checked for a TSX-enabled TD (the host has no TSX)",
       "the dpamt generation uses 1.5.06's CPUID tables")),
    C(Leaf.TDH_MNG_RD, BOTH, (API + "tdh_mng_rd_wr.c", MD + "metadata_td.c",
                              MD + "metadata_generic.c", HELPERS),
      ("version 0/1 (>1 -> OPERAND_INVALID|RAX); R8 = 0 and v1 RDX = -1 at entry",
       "TDR (RCX) shared, TDCS + OP_STATE shared; context code forced to TD",
       "v1 null id -> first readable TD field + FIRST_FIELD_ID_IN_CONTEXT; v1 RDX = next",
       "single-element id check, class + field code lookup in the tdr_tdcs table",
       "prod / debug read masks (FIELD_NOT_READABLE), bare statuses",
       "CPUID_VALUES leaf/subleaf code with reserved bits",
       "CPUID_VALUES follows 1.5.06's cpuid_lookup: FIELD_ID_INCORRECT outside it, "
       "FIELD_NOT_READABLE for faulting slots and before TDH.MNG.INIT; NUM_CPUID_VALUES "
       "73; iteration in slot order"),
      ("TD tables are 1.5.01's auto-generated ones (2.0.08's are not public in the index)",
       "fields the model does not compute read their stored value (0 unless written)"),
      ),
    C(Leaf.TDH_MNG_WR, BOTH, (API + "tdh_mng_rd_wr.c", MD + "metadata_td.c",
                              MD + "metadata_generic.c"),
      ("TDR shared, TDCS + OP_STATE shared, single-element check",
       "write mask & R9 = 0 -> FIELD_NOT_WRITABLE; forbidden bits -> FIELD_VALUE_NOT_VALID",
       "HP_LOCK_TIMEOUT: full mask (WR_MASK_NOT_VALID) and 10 ms..100 s (VALUE_NOT_VALID)"),
      ("HP_LOCK_TIMEOUT reads back the microseconds written, not TSC ticks",
       "the atomic-store failure (OPERAND_BUSY|METADATA_FIELD) cannot happen in the model",
       "migration / TD_CTLS special writes are not modelled")),
    C(Leaf.TDH_MNG_VPFLUSHDONE, BOTH, (API + "tdh_mng_vpflushdone.c",),
      ("FLUSHVP_NOT_DONE while any vCPU is associated (VP.RD/WR/INIT associate)",)),
    C(Leaf.TDH_MNG_KEY_FREEID, BOTH, (API + "tdh_mng_key_freeid.c",),
      ("lifecycle, KOT lock, WBCACHE_NOT_COMPLETE",)),
    C(Leaf.TDH_MNG_KEY_RECLAIMID, BOTH, (API + "tdh_mng_key_reclaimid.c",),
      ("succeeds (a no-op since TDX 1.5)",)),
    # --- vCPU ----------------------------------------------------------------------------------
    C(Leaf.TDH_VP_CREATE, BOTH, (API + "tdh_vp_create.c",),
      ("TDR (RDX) shared, TDCS op state, TDVPR page exclusive (RCX)",)),
    C(Leaf.TDH_VP_ADDCX, BOTH, (API + "tdh_vp_addcx.c",),
      ("TDVPR (RDX) exclusive, implicit TDR, state, TDCX_NUM_INCORRECT",)),
    C(Leaf.TDH_VP_INIT, BOTH, (API + "tdh_vp_init.c", HELPERS),
      ("version 1 in both generations (>1 -> OPERAND_INVALID|RAX); v1 TDR exclusive",
       "TDVPS page count, VCPU_STATE_INCORRECT (2.0.08: | state), MAX_VCPUS_EXCEEDED",
       "v1 R8 > 32 bits -> OPERAND_INVALID|R8; duplicate -> X2APIC_ID_NOT_UNIQUE | id",
       "associates the vCPU with the calling LP",
       "1.5: NUM_VCPUS stays incremented after X2APIC_ID_NOT_UNIQUE (2.0.08 undoes it)"),
      ("2.0.08 checks TSC_ADJUST before the version; the model has no TSC_ADJUST check",)),
    C(Leaf.TDH_VP_RD, BOTH, (API + "tdh_vp_rd_wr.c", HELPERS, MD + "metadata_vp.c",
                             MD + "metadata_generic.c"),
      ("version 0/1 (>1 -> OPERAND_INVALID|RAX); R8 = 0 and v1 RDX = -1 at entry",
       "TDVPR (RCX) shared, implicit TDR shared (BUSY|TDR), TDCS + OP_STATE shared",
       "TDVPS page count -> TDCX_NUM_INCORRECT",
       "check_and_associate_vcpu: VCPU_STATE_INCORRECT (2.0.08: | state), VCPU_ASSOCIATED, "
       "binding an unassociated vCPU to the LP (kept after the call)",
       "v1 null id -> first readable VP field; v1 RDX = next readable element",
       "single-element check; td_vmcs / tdvps table lookup; VMCS HIGH access refused; "
       "L2 classes refused (no L2 VM); prod / debug read masks; bare statuses"),
      ("VP tables are 1.5.01's auto-generated ones",
       "a VMCS field in the table is always VMREAD-able; fields the model does not compute "
       "read their stored value (VMCS initial values: PI vector 0xFFFF, PI descriptor "
       "NULL_PA, others 0)")),
    C(Leaf.TDH_VP_WR, BOTH, (API + "tdh_vp_rd_wr.c", HELPERS, MD + "metadata_vp.c"),
      ("version 0 only (dispatcher)", "same opening checks and association as TDH.VP.RD",
       "combined mask 0 -> FIELD_NOT_WRITABLE; forbidden bits (with the NULL_PA "
       "adjustment) -> FIELD_VALUE_NOT_VALID",
       "shared-HPA fields: shared_hpa_check (64 bytes for the PI descriptor); private-GPA "
       "fields (guest CR3 on a debug TD): check_gpa_validity",
       "PI vector <= 255; pin-based bit 7 needs the PI vector and descriptor "
       "(TD_VMCS_FIELD_NOT_INITIALIZED | encoding)"),
      ("CR0/CR4, DEBUGCTL and secondary-controls special checks are not modelled (no CPU "
       "capability model)",)),
    C(Leaf.TDH_VP_FLUSH, BOTH, (API + "tdh_vp_flush.c",),
      ("TDVPR exclusive, page count, VCPU_NOT_ASSOCIATED unless on the associated LP",)),
    C(Leaf.TDH_VP_ENTER, (T15,), ("src/td_transitions/tdh_vp_enter.c", HELPERS,
                                  "src/td_transitions/td_exit.c",
                                  "src/td_transitions/td_exit_stepping.c"),
      ("vcpu_and_flags_t reserved bits 11:0, 63:54 -> OPERAND_INVALID|RCX",
       "TDVPR shared (check_and_lock_explicit_4k_private_hpa, operand RCX); TDR implicit "
       "shared (BUSY|TDR); TDCS + OP_STATE shared, RUNNABLE only (OP_STATE_INCORRECT)",
       "map_tdvps: TDCX_NUM_INCORRECT",
       "check_and_associate_vcpu: VCPU_STATE_INCORRECT unless READY (ACTIVE while another "
       "LP runs it, DISABLED after a triple fault), VCPU_ASSOCIATED when another LP holds it",
       "HOST_RECOVERABILITY_HINT only after an ASYNC_TRAP exit, RESUME_L1 (no L2) -> "
       "OPERAND_INVALID|RCX",
       "adjust_tlb_tracking_state: epoch lock shared (BUSY|TD_EPOCH), the vCPU joins the "
       "TD epoch's refcount until its exit; TDVPR and TDR locks held while the guest runs",
       "TD exits: TDCALL 77 (TDG.VP.VMCALL GPRs by the guest's mask), EPT violation 48 "
       "(unmapped, blocked, PENDING access with EEQ type 6, ACCEPT level in the EEQ), "
       "triple fault 2 (NON_RECOVERABLE_VCPU, vCPU DISABLED), OTHER_SMI 6 for the end of a "
       "time slice or a TRACK kick; re-entry loads KVM's TDVMCALL replies",
       "0-step mitigation: private-GPA EPT-violation exits at one RIP counted to "
       "STEPPING_EPF_THRESHOLD 6, then their GPAs logged (EPF_GPA_LIST_SIZE 32); a RIP "
       "change resets; with GPAs logged VP.ENTER takes the S-EPT tree lock exclusive "
       "(BUSY|SEPT_TREE, refcount reverted) and a GPA that would still fault ends the call "
       "with an emulated EPT-violation exit, the guest not entered"),
      ("LP MSR checks (LIMIT_CPUID_MAXVAL, IA32_TSC_ADJUST, MONITOR_FSM), TSC rollback, the "
       "interrupt/MTF single-step filter, the NOTIFY_ENABLES #VE of a suspected 0-step "
       "attack and L2 VMs are not modelled",
       "guest code runs on the TD vCPU engine (unicorn 2.1.4 with vtdx's patch): no "
       "interrupt injection, events delivered CPL0 -> CPL0 in 64-bit mode only "
       "(vtdx/module/engine/INTEGRATION.md); what the engine cannot model ends the entry "
       "with NON_RECOVERABLE_VCPU and an internal error",
       "2.0.08 (dpamt generation) not compared")),
    # --- S-EPT and private memory --------------------------------------------------------------
    C(Leaf.TDH_MEM_SEPT_ADD, BOTH, (API + "tdh_mem_sept_add.c", HELPERS),
      ("td_handle_and_flags_t: reserved bits -> OPERAND_INVALID|RDX before the TDR; "
       "ALLOW_EXISTING",
       "bit 63 of non-NULL page PAs ignored; v0 NULL_PA -> OPERAND_INVALID|R8 after the walk",
       "version 1: R9-R11 refused (no L2 VM) with OPERAND_INVALID|R8+vm; R8-R11 returned "
       "(NULL_PA used, bit 63 not used); NULL_PA allowed on a mapped entry",
       "page info levels 1..PWL, S-EPT walk and entry lock"),
      ("L2 S-EPT pages (no L2 VMs in the model)",)),
    C(Leaf.TDH_MEM_SEPT_REMOVE, BOTH, (API + "tdh_mem_sept_remove.c", HELPERS),
      ("version 0/1 pass (>1 -> OPERAND_INVALID|RAX); blocked + TLB tracked; page empty",),
      ("version 1's L2 outputs are not produced (no L2 VMs)",)),
    C(Leaf.TDH_MEM_PAGE_ADD, BOTH, (API + "tdh_mem_page_add.c", HELPERS),
      ("plain TDR handle (RDX) exclusive, page info level 0, source page, measurement",)),
    C(Leaf.TDH_MEM_PAGE_AUG, BOTH, (API + "tdh_mem_page_aug.c", HELPERS),
      ("plain TDR handle, levels 0..1, entry state",)),
    C(Leaf.TDH_MEM_PAGE_REMOVE, BOTH, (API + "tdh_mem_page_remove.c", HELPERS),
      ("levels 0..2, blocked + TLB tracked",)),
    C(Leaf.TDH_MEM_PAGE_DEMOTE, BOTH, (API + "tdh_mem_page_demote.c", HELPERS),
      ("td_handle_and_flags_t (bit 0 = L2_SEPT_ADD_MODE accepted, reserved bits refused)",
       "levels 1..2, blocked + tracked, new S-EPT page, Dynamic PAMT pair (R12/R13)"),
      ("L2 S-EPT pages (no L2 VMs); R12/R13 follow the Linux Dynamic PAMT series",)),
    C(Leaf.TDH_MEM_PAGE_PROMOTE, BOTH, (API + "tdh_mem_page_promote.c", HELPERS),
      ("version 0/1 pass (>1 -> OPERAND_INVALID|RAX); promote conditions, tracking",),
      ("version 1's L2 outputs are not produced (no L2 VMs)",)),
    C(Leaf.TDH_MEM_RANGE_BLOCK, BOTH, (API + "tdh_mem_range_block.c", HELPERS),
      ("page info, tree lock exclusive, BEPOCH stamp",)),
    C(Leaf.TDH_MEM_RANGE_UNBLOCK, BOTH, (API + "tdh_mem_range_unblock.c", HELPERS),
      ("page info, entry state",)),
    C(Leaf.TDH_MEM_TRACK, BOTH, (API + "tdh_mem_track.c",),
      ("epoch lock, PREVIOUS_TLB_EPOCH_BUSY, TD_EPOCH++",)),
    C(Leaf.TDH_MR_EXTEND, BOTH, (API + "tdh_mr_extend.c",),
      ("SHA-384 of the 256-byte chunk with its GPA block",)),
    C(Leaf.TDH_MR_FINALIZE, BOTH, (API + "tdh_mr_finalize.c",),
      ("MRTD finalised, TD runnable",)),
)

#: Leaves whose whole path was read against the trees for the generation work (the rest keep
#: the statement of their handler; see NOT_AUDITED).
AUDITED = frozenset({
    Leaf.TDH_SYS_RD, Leaf.TDH_SYS_RDALL, Leaf.TDH_MNG_RD, Leaf.TDH_MNG_WR, Leaf.TDH_VP_INIT,
    Leaf.TDH_VP_RD, Leaf.TDH_VP_WR, Leaf.TDH_MEM_SEPT_ADD,
})

GENERATION_ROWS = (
    ("version reported", "version"),
    ("TDCS pages (TDCS_BASE_SIZE / 4K)", "tdcs_pages"),
    ("TDVPS pages", "tdvps_pages"),
    ("MAX_VCPUS_PER_TD", "max_vcpus_per_td"),
    ("TDX_FEATURES0 of the tree", "features0"),
    ("VCPU_STATE_INCORRECT carries the state", "vcpu_state_operand"),
    ("NUM_CMRS reads MAX_CMR (32)", "num_cmrs_is_max"),
    ("VP.INIT duplicate x2APIC id keeps NUM_VCPUS", "x2apic_dup_keeps_vcpu_count"),
)


def by_leaf() -> dict[int, Conformance]:
    out: dict[int, Conformance] = {}
    for c in DECLARED:
        if c.leaf in out:
            raise AssertionError(f"{leaf_name(c.leaf)} declared twice")
        out[c.leaf] = c
    return out


def _fmt(value: object) -> str:
    if isinstance(value, tuple):
        return ".".join(f"{x:02d}" if i == 2 else str(x) for i, x in enumerate(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value > 0xFFFF:
        return f"0x{value:X}"
    return str(value)


def render() -> str:
    """docs/conformance.md."""
    lines = [
        "# Conformance: which tdx-module tree and file each leaf follows",
        "",
        "GENERATED by `python -m vtdx.module.conformance > docs/conformance.md` from",
        "`vtdx/module/conformance.py`; `tests/test_conformance.py` fails when this page is",
        "stale, when a leaf of the dispatcher's table is not declared, or when a",
        "declaration names no source file. A check is listed as modelled only when the",
        "handler makes it with the module's status and operand id.",
        "",
        "## Generations",
        "",
        "| | " + " | ".join(f"`{g}`" for g in GENERATIONS) + " |",
        "|---|" + "---|" * len(GENERATIONS),
        "| tree | " + " | ".join(g.tree for g in GENERATIONS.values()) + " |",
    ]
    for label, attr in GENERATION_ROWS:
        lines.append(f"| {label} | " + " | ".join(
            _fmt(getattr(g, attr)) for g in GENERATIONS.values()) + " |")
    lines.append("| leaves with version 1 | " + " | ".join(
        ", ".join(leaf_name(leaf) for leaf, _ in g.leaf_versions)
        for g in GENERATIONS.values()) + " |")
    lines += ["", f"Line numbers in tests and docstrings are those of tag TDX_1.5.01 where "
              f"1.5.06 is the same; {_COMMON_GAP_15}.", "", "## Leaves", ""]
    for c in sorted(DECLARED, key=lambda c: c.leaf):
        lines.append(f"### {leaf_name(c.leaf)} ({int(c.leaf)})")
        lines.append("")
        lines.append("- trees: " + ", ".join(f"`{t}`" for t in c.trees))
        lines.append("- files: " + ", ".join(f"`{f}`" for f in c.files))
        lines.append("- modelled:")
        lines += [f"  - {m}" for m in c.modelled]
        gaps = c.gaps if c.leaf in AUDITED else (*c.gaps, NOT_AUDITED)
        lines.append("- gaps:" + ("" if gaps else " none known"))
        lines += [f"  - {g}" for g in gaps]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
