"""Platform profile: the one description of the virtual TDX machine.

The daemon builds it from the VM's configuration (vCPUs, RAM) and hands it to both the
TDX module model (CMRs, logical processors, keyids, feature bits) and, through
``vtdx.runtime.platform_rows``, to the QEMU plugin (CPUID bits and MSR values the guest
kernel checks).
Tests build variants (fewer keyids, no MOVDIR64B, Dynamic PAMT on) from the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vtdx.abi import fields as f
from vtdx.errors import VtdxError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: QEMU q35 keeps at most this much RAM below 4 GiB once RAM reaches 0xb0000000.
Q35_LOWMEM_SPLIT = 0xB000_0000
Q35_LOWMEM_MAX = 0x8000_0000
FOUR_GIB = 4 * GiB


@dataclass(frozen=True, slots=True)
class Region:
    """A physical address range [base, base + size)."""

    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, pa: int, size: int = 1) -> bool:
        return self.base <= pa and pa + size <= self.end


def q35_ram_layout(mem_bytes: int) -> tuple[Region, ...]:
    """Guest-physical RAM regions QEMU's q35 machine creates for ``mem_bytes`` of RAM.

    Same rule as QEMU's pc_q35: everything below 4 GiB when RAM is under 0xb0000000,
    otherwise 2 GiB below and the rest from 4 GiB up (the PCI hole in between).
    """
    low = mem_bytes if mem_bytes < Q35_LOWMEM_SPLIT else Q35_LOWMEM_MAX
    regions = [Region(0, low)]
    if mem_bytes > low:
        regions.append(Region(FOUR_GIB, mem_bytes - low))
    return tuple(regions)


@dataclass(frozen=True, slots=True)
class Generation:
    """What one public tdx-module tree reports and does where the trees differ.

    The model follows exactly one tree per generation (docs/conformance.md names the file
    and lines per leaf). Values a kernel can observe: the version (Linux prints it as
    "Module version"), TDX_FEATURES0 as the tree's metadata_sys.c sets it (before the
    profile's feature toggles), the TD control-structure sizes KVM derives its TDCX/TDVPX
    page counts from, the TD vCPU limit, and which statuses carry an operand id.
    """

    name: str
    #: The tree followed: repository, version and commit.
    tree: str
    major: int
    minor: int
    update: int
    #: TDX_FEATURES0 as the tree sets it (metadata_sys.c, md_sys_get_elements).
    features0: int
    #: MIN_NUM_TDCS_PAGES (td_control_structures.h) -> TDCS_BASE_SIZE = pages * 4K.
    tdcs_pages: int
    #: MIN_TDVPS_PAGES (tdx_tdvps.h) -> TDVPS_BASE_SIZE = pages * 4K.
    tdvps_pages: int
    #: MAX_VCPUS_PER_TD (td_control_structures.h), SYS.RD 0x9900000100000008.
    max_vcpus_per_td: int
    #: CONFIG_FLAGS_FIXED0 (bits of TD_PARAMS.CONFIG_FLAGS the tree accepts).
    config_flags_fixed0: int
    #: TDX_VCPU_STATE_INCORRECT from check_and_associate_vcpu / VP.INIT carries the vCPU
    #: state as operand id (helpers.c of 2.0.08) or is bare (1.5.x).
    vcpu_state_operand: bool
    #: Highest version the dispatcher accepts per leaf number (tdx_vmm_dispatcher.c);
    #: leaves not named accept version 0 only.
    leaf_versions: tuple[tuple[int, int], ...]
    #: NUM_CMRS reads MAX_CMR (32) whatever the platform has (metadata_sys.c 143-146 of the
    #: 1.5 tree); False: the number of CMRs (2.0.08's metadata_sys.c was not read).
    num_cmrs_is_max: bool = False
    #: TDH.VP.INIT version 1 with a duplicate x2APIC id leaves NUM_VCPUS incremented (the
    #: 1.5 tree returns X2APIC_ID_NOT_UNIQUE without undoing the increment it made for the
    #: vCPU index; 2.0.08 undoes it).
    x2apic_dup_keeps_vcpu_count: bool = False

    @property
    def version(self) -> tuple[int, int, int]:
        return self.major, self.minor, self.update

    @property
    def version_string(self) -> str:
        """As Linux prints it (TDX_VERSION_FMT "%u.%u.%02u")."""
        return f"{self.major}.{self.minor}.{self.update:02d}"

    def max_version(self, leaf: int) -> int:
        return dict(self.leaf_versions).get(leaf, 0)


#: TDX_FEATURES0 of 1.5.06: the 1.5.01 set (td_migration, td_preserving, service_td,
#: tdg_vp_rdwr, relaxed_mem_mng_concurrency, cpuid_virt_guest_ctrl, td_partitioning,
#: td_entry_enhancements, host_priority_locks, config_ia32_arch_cap,
#: pending_ept_violation_v2, fms_config, no_rbp_mod, l2_tlb_invd_opt; local_attestation
#: off: no SEAMVERIFYREPORT) plus topology_enum, icssd, fixed_ctr12_prof, maxpa_virt and
#: cpuid2_virt (bits 20, 25, 26, 27, 29).
_FEATURES0_1_5_06 = 0x2E1F0EBF

# Leaf numbers of the multi-version leaves (vtdx.abi.leaves.Leaf; plain ints here to keep
# the profile free of module imports): MEM.SEPT.ADD 3, MNG.RD 11, VP.INIT 22,
# MEM.PAGE.PROMOTE 23, VP.RD 26, MEM.SEPT.REMOVE 30, SYS.INIT 33.
_V1_COMMON = ((3, 1), (11, 1), (22, 1), (23, 1), (26, 1), (30, 1))

GENERATIONS: dict[str, Generation] = {
    "1.5": Generation(
        name="1.5", tree="intel/tdx-module 1.5.06 (commit 1e636985)",
        major=1, minor=5, update=6, features0=_FEATURES0_1_5_06,
        tdcs_pages=6, tdvps_pages=6, max_vcpus_per_td=576, config_flags_fixed0=0x7,
        vcpu_state_operand=False, leaf_versions=_V1_COMMON, num_cmrs_is_max=True,
        x2apic_dup_keeps_vcpu_count=True),
    "dpamt": Generation(
        name="dpamt", tree="intel/tdx-module 2.0.08 (commit 1666adc4, Dynamic PAMT)",
        major=2, minor=0, update=8, features0=_FEATURES0_1_5_06,
        tdcs_pages=9, tdvps_pages=6, max_vcpus_per_td=1376, config_flags_fixed0=0x1F,
        vcpu_state_operand=True, leaf_versions=(*_V1_COMMON, (33, 1))),
}


@dataclass(frozen=True, slots=True)
class Profile:
    """Everything that differs between two virtual TDX platforms."""

    name: str = "default"
    num_lps: int = 2
    num_packages: int = 1
    ram: tuple[Region, ...] = field(default_factory=lambda: q35_ram_layout(2 * GiB))
    #: Convertible memory ranges; default: all RAM (see ``from_vm``).
    cmrs: tuple[Region, ...] = field(default_factory=lambda: q35_ram_layout(2 * GiB))
    #: IA32_MKTME_KEYID_PARTITIONING: MKTME keyids [1, mktme_keyids], TDX keyids after them.
    mktme_keyids: int = 15
    tdx_keyids: int = 16
    #: Physical address bits CPUID reports; the top ``keyid_bits`` carry the keyid.
    #: TDX platforms report 52: the BIOS switch that limits the CPU to 46 address bits turns
    #: TME-MT, and with it TDX, off. Linux then runs with 52 - keyid_bits = 46 bits. KVM
    #: depends on it: it bounds the walk that frees a TD's page tables at VM destruction at
    #: the raw CPUID MAXPHYADDR (tdp_mmu_max_gfn_exclusive in mmu/tdp_mmu.c, used by
    #: for_each_tdp_pte_min_level_all in mmu/tdp_iter.h), while a TD's shared mappings sit
    #: at GPA bit 47 (TDX_SHARED_BIT_PWL_4 in vmx/tdx.c); below 48 bits the shared EPT's
    #: page tables are never freed and KVM_PROVE_MMU warns (tdp_mmu.c, tdp_mmu_pages).
    phys_bits: int = 52
    keyid_bits: int = 6
    #: CPU features the facade advertises (the kernel refuses TDX without them).
    movdir64b: bool = True
    #: Which public tdx-module tree the model follows where the trees differ: ``"1.5"``
    #: (intel/tdx-module 1.5.x) or ``"dpamt"`` (the public tree with Dynamic PAMT).
    generation: str = "1.5"
    #: TDX module features (TDX_FEATURES0 bits are derived from these, see ``features0``;
    #: users switch them by the names in ``FEATURES``).
    dynamic_pamt: bool = False
    demote_nointerrupt: bool = False
    no_rbp_mod: bool = True
    topology_enum: bool = True
    sys_disable: bool = True
    td_preserving: bool = True
    #: Module identity and limits reported through TDH.SYS.RD (the version, the
    #: control-structure sizes and MAX_VCPUS_PER_TD are the generation's, see ``gen``).
    build_num: int = 0
    build_date: int = 20260101
    max_tdmrs: int = 64
    max_reserved_per_tdmr: int = 16
    #: Bytes per PAMT entry at 4K/2M/1G (the module's pamt_entry_t is 16 bytes).
    pamt_entry_sizes: tuple[int, int, int] = (16, 16, 16)
    pamt_bitmap_entry_bits: int = 4
    #: Size of the TDR (bytes); TDCS/TDVPS sizes come from the generation.
    tdr_base_size: int = 4096
    attributes_fixed0: int = 0x0000_0000_5000_0001
    attributes_fixed1: int = 0
    xfam_fixed0: int = 0x0006_1AE7
    xfam_fixed1: int = 0x3
    config_flags_fixed1: int = 0
    #: CPUID family/model/stepping per package (CPUID.1.EAX), the module's platform F/M/S.
    #: The host sees the same (vtdx.platform.cpuid adjusts CPUID(1).EAX to it): the default is
    #: what QEMU TCG's "max" CPU reports, so the host kernel runs no model-specific code.
    cpu_fms: int = 0x00000663

    @classmethod
    def from_vm(cls, smp: int, mem_bytes: int, **overrides: Any) -> Profile:
        """Profile for a q35 VM with ``smp`` vCPUs and ``mem_bytes`` of RAM."""
        ram = q35_ram_layout(mem_bytes)
        base = cls(num_lps=smp, ram=ram, cmrs=ram)
        return replace(base, **overrides) if overrides else base

    @classmethod
    def named(cls, name: str, smp: int, mem_bytes: int, features: str = "") -> Profile:
        """The profile ``name`` (see ``PROFILES``) for a q35 VM, with ``features`` applied."""
        if name not in PROFILES:
            raise VtdxError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
        base = cls.from_vm(smp, mem_bytes, name=name, **PROFILES[name])
        return base.with_features(features) if features else base

    def with_features(self, spec: str) -> Profile:
        """Apply ``+name,-name,...`` (a bare ``name`` means ``+name``) to the module features."""
        changes: dict[str, bool] = {}
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            on = not item.startswith("-")
            name = item.lstrip("+-")
            if name not in FEATURES:
                raise VtdxError(f"unknown feature {name!r} (choose from "
                                f"{', '.join(sorted(FEATURES))})")
            changes[FEATURES[name]] = on
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    @property
    def features(self) -> dict[str, bool]:
        """Every switchable module feature by its user-facing name, on or off."""
        return {name: bool(getattr(self, attr)) for name, attr in FEATURES.items()}

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram)

    @property
    def tdx_keyid_start(self) -> int:
        return self.mktme_keyids + 1

    @property
    def lps_per_package(self) -> int:
        return max(1, self.num_lps // self.num_packages)

    def package_of(self, lp: int) -> int:
        return min(lp // self.lps_per_package, self.num_packages - 1)

    @property
    def gen(self) -> Generation:
        """The tree this profile's module follows (``generation`` names it)."""
        try:
            return GENERATIONS[self.generation]
        except KeyError:
            raise VtdxError(f"unknown module generation {self.generation!r} (choose from "
                            f"{', '.join(GENERATIONS)})") from None

    @property
    def module_version(self) -> tuple[int, int, int]:
        return self.gen.version

    @property
    def tdcs_base_size(self) -> int:
        return self.gen.tdcs_pages * 4096

    @property
    def tdvps_base_size(self) -> int:
        return self.gen.tdvps_pages * 4096

    @property
    def max_vcpus_per_td(self) -> int:
        return self.gen.max_vcpus_per_td

    @property
    def config_flags_fixed0(self) -> int:
        return self.gen.config_flags_fixed0

    @property
    def features0(self) -> int:
        """TDX_FEATURES0 as the module reports it: the generation's value with the
        switchable bits (``FEATURES``) set as this profile says (bit numbers:
        vtdx.abi.fields)."""
        bits = {
            f.FEATURES0_TD_PRESERVING: self.td_preserving,
            f.FEATURES0_NO_RBP_MOD: self.no_rbp_mod,
            f.FEATURES0_TOPOLOGY_ENUM: self.topology_enum,
            f.FEATURES0_DYNAMIC_PAMT: self.dynamic_pamt,
            f.FEATURES0_DEMOTE_NOINTERRUPT: self.demote_nointerrupt,
            f.FEATURES0_SYS_DISABLE: self.sys_disable,
        }
        base = self.gen.features0 & ~sum(bits)
        return base | sum(bit for bit, on in bits.items() if on)

    @property
    def hkid_start_bit(self) -> int:
        """Lowest physical-address bit that carries the keyid."""
        return self.phys_bits - self.keyid_bits

    @property
    def tdx_keyid_end(self) -> int:
        """One past the last TDX private keyid."""
        return self.tdx_keyid_start + self.tdx_keyids

    def to_dict(self) -> dict[str, object]:
        """Plain data for inspection (QMP) and logs."""
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in ("ram", "cmrs"):
                value = [{"base": r.base, "size": r.size} for r in value]
            out[name] = value
        out["features0"] = self.features0
        out["module_version"] = self.gen.version_string
        out["module_tree"] = self.gen.tree
        return out


#: Module features a user switches with ``--features +name,-name``: name -> Profile field.
#: Each is a TDX_FEATURES0 bit the module reports and whose behaviour the model follows.
FEATURES: dict[str, str] = {
    "dynamic-pamt": "dynamic_pamt",            # bit 36: PAMT.ADD/REMOVE, 4K PAMT on demand
    "demote-nointerrupt": "demote_nointerrupt",  # bit 51: DEMOTE never interrupted
    "no-rbp-mod": "no_rbp_mod",                # bit 18: the module preserves RBP
    "topology-enum": "topology_enum",          # bit 20: KVM requires it for any TD
    "sys-disable": "sys_disable",              # bit 53: TDH.SYS.DISABLE exists
    "td-preserving": "td_preserving",          # bit 1: TD-preserving module update
}

#: Named platforms (``--profile NAME``): overrides of the default profile. ``dpamt`` is what
#: a kernel carrying Dynamic PAMT needs; a kernel without it still boots on static PAMT
#: (TDH.SYS.CONFIG turns Dynamic PAMT on only when the kernel asks for it).
PROFILES: dict[str, dict[str, object]] = {
    "default": {},
    "dpamt": {"generation": "dpamt", "dynamic_pamt": True, "demote_nointerrupt": True},
    # Platforms that lack what Linux needs; the kernel refuses TDX the way it would on hardware.
    "no-movdir64b": {"movdir64b": False},
    "one-keyid": {"tdx_keyids": 1},
}
