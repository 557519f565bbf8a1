//! The AMD code objects embedded at build time (see `build.rs`), one per offline routing config
//! and architecture.

use crate::elf::{self, CodeObjectInfo};

/// One embedded code object: a raw AMDGPU ELF for one architecture and one routing config.
#[derive(Debug, Clone, Copy)]
pub struct CodeObject {
    /// The offline config it was compiled for (a name from `kernels/gpu/offline_configs.txt`).
    pub config: &'static str,
    /// The architecture it was compiled for (`gfx90a`, `gfx942`, `gfx950`).
    pub arch: &'static str,
    /// The ELF image, as `hipModuleLoadData` takes it.
    pub elf: &'static [u8],
}

impl CodeObject {
    /// Its architecture and kernels as its ELF states them.
    pub fn inspect(&self) -> Option<CodeObjectInfo> {
        elf::inspect(self.elf)
    }
}

include!(concat!(env!("OUT_DIR"), "/code_objects.rs"));

/// Whether this build embeds AMD kernels at all.
pub fn built_with_kernels() -> bool {
    !CODE_OBJECTS.is_empty()
}

/// The architectures embedded, in build order, each once.
pub fn architectures() -> Vec<&'static str> {
    let mut archs: Vec<&'static str> = Vec::new();
    for object in CODE_OBJECTS {
        if !archs.contains(&object.arch) {
            archs.push(object.arch);
        }
    }
    archs
}

/// The routing configs embedded, in build order, each once.
pub fn configs() -> Vec<&'static str> {
    let mut configs: Vec<&'static str> = CODE_OBJECTS.iter().map(|object| object.config).collect();
    configs.dedup();
    configs
}
