//! Just enough of ELF64 to describe an AMD code object: its machine, its architecture and the
//! kernels it exports. Every read is bounds-checked; a malformed object is `None`, never a panic.

/// `EM_AMDGPU`.
const EM_AMDGPU: u16 = 0xE0;
/// `SHT_DYNSYM`: the symbols the HIP loader resolves kernels from.
const SHT_DYNSYM: u32 = 11;
/// The `.kd` suffix of a kernel descriptor symbol; one per kernel.
const KERNEL_DESCRIPTOR_SUFFIX: &str = ".kd";

/// The architecture numbers in `e_flags & EF_AMDGPU_MACH` (LLVM's `ELF.h`) this crate builds for.
const MACHINES: [(u32, &str); 3] = [(0x3f, "gfx90a"), (0x4c, "gfx942"), (0x4f, "gfx950")];

/// What an AMD code object says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeObjectInfo {
    /// The architecture named by the ELF header (`None`: one this crate does not know).
    pub arch: Option<&'static str>,
    /// The kernels it exports, sorted.
    pub kernels: Vec<String>,
}

/// Reads an AMD code object; `None` if `bytes` is not a 64-bit little-endian AMDGPU ELF.
pub fn inspect(bytes: &[u8]) -> Option<CodeObjectInfo> {
    if bytes.get(..6)? != b"\x7fELF\x02\x01" || u16_at(bytes, 0x12)? != EM_AMDGPU {
        return None;
    }
    let mach = u32_at(bytes, 0x30)? & 0xff;
    let arch = MACHINES.iter().find(|(m, _)| *m == mach).map(|(_, name)| *name);
    let (shoff, shentsize, shnum) =
        (u64_at(bytes, 0x28)?, u16_at(bytes, 0x3a)? as u64, u16_at(bytes, 0x3c)? as u64);
    let sections: Vec<u64> = (0..shnum).map(|i| shoff + i * shentsize).collect();
    let mut kernels = Vec::new();
    for &header in &sections {
        if u32_at(bytes, header + 4)? != SHT_DYNSYM {
            continue;
        }
        let (offset, size, entsize) = (
            u64_at(bytes, header + 0x18)?,
            u64_at(bytes, header + 0x20)?,
            u64_at(bytes, header + 0x38)?,
        );
        let strings = *sections.get(u32_at(bytes, header + 0x28)? as usize)?;
        let strings_offset = u64_at(bytes, strings + 0x18)?;
        for symbol in (offset..offset + size).step_by(usize::try_from(entsize.max(1)).ok()?) {
            let name = c_string_at(bytes, strings_offset + u64::from(u32_at(bytes, symbol)?))?;
            if let Some(kernel) = name.strip_suffix(KERNEL_DESCRIPTOR_SUFFIX) {
                kernels.push(kernel.to_owned());
            }
        }
    }
    kernels.sort();
    Some(CodeObjectInfo { arch, kernels })
}

fn slice(bytes: &[u8], at: u64, len: usize) -> Option<&[u8]> {
    let at = usize::try_from(at).ok()?;
    bytes.get(at..at.checked_add(len)?)
}

fn u16_at(bytes: &[u8], at: u64) -> Option<u16> {
    Some(u16::from_le_bytes(slice(bytes, at, 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: u64) -> Option<u32> {
    Some(u32::from_le_bytes(slice(bytes, at, 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: u64) -> Option<u64> {
    Some(u64::from_le_bytes(slice(bytes, at, 8)?.try_into().ok()?))
}

fn c_string_at(bytes: &[u8], at: u64) -> Option<&str> {
    let rest = bytes.get(usize::try_from(at).ok()?..)?;
    std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_an_amdgpu_elf_is_refused() {
        assert_eq!(inspect(b""), None);
        assert_eq!(inspect(b"\x7fELF\x01\x01"), None);
        // A 64-bit ELF header for x86-64 (EM_X86_64 = 62).
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x12] = 62;
        assert_eq!(inspect(&header), None);
        // The same header claiming AMDGPU but truncated before its fields.
        header[0x12] = 0xE0;
        assert_eq!(inspect(&header[..0x20]), None);
    }
}
