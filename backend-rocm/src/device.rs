//! Opening one AMD GPU (everything that must hold before anything is enqueued on it) and loading
//! the embedded code objects on it.

use std::ffi::{CString, c_int};
use std::sync::Arc;

use crate::api::Handle;
use crate::code_objects::{CODE_OBJECTS, built_with_kernels};
use crate::error::RocmError;
use crate::runtime::HipRuntime;

/// An AMD GPU that this build has kernels for and the runtime can reach.
#[derive(Debug)]
pub struct RocmDevice {
    runtime: HipRuntime,
    ordinal: usize,
    name: String,
}

impl RocmDevice {
    /// Checks, in this order, that the build embeds AMD kernels, that the HIP runtime loads and
    /// that device `ordinal` exists; the first that fails is the error.
    pub fn open(ordinal: usize) -> Result<Self, RocmError> {
        if !built_with_kernels() {
            return Err(RocmError::BuiltWithoutKernels);
        }
        let runtime = HipRuntime::load()?;
        let name = runtime.device_name(ordinal)?;
        Ok(RocmDevice { runtime, ordinal, name })
    }

    /// The runtime it was opened through.
    pub fn runtime(&self) -> &HipRuntime {
        &self.runtime
    }

    /// Its ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Its name as the runtime reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes it the calling thread's current device, which HIP's allocations, module loads and
    /// the null stream refer to. Not a stream operation: allowed while a stream is captured.
    pub fn make_current(&self) -> Result<(), RocmError> {
        // SAFETY: `hipSetDevice` takes any int and fails for one that is not a device; `ordinal`
        // was checked against the device count in `open`, so it also fits an int.
        let status = unsafe { (self.runtime.api().hipSetDevice)(self.ordinal as c_int) };
        Ok(self.runtime.check("hipSetDevice", status)?)
    }
}

/// The code objects of one routing config, loaded on a device, with every kernel resolved.
#[derive(Debug)]
pub struct LoadedModule {
    device: Arc<RocmDevice>,
    module: Handle,
    arch: &'static str,
    kernels: Vec<(String, Handle)>,
    /// The image the module was loaded from, which outlives it: HIP does not document whether
    /// `hipModuleLoadData` copies it.
    _image: Vec<u64>,
}

// SAFETY: HIP module and function handles name process-wide runtime objects that the runtime
// lets any thread use (launching a kernel is thread-safe); this type only reads them, and unloads
// the module once, on drop, when no other reference to it exists.
unsafe impl Send for LoadedModule {}
// SAFETY: as for `Send`: shared access only looks handles up and passes them to the runtime.
unsafe impl Sync for LoadedModule {}

impl RocmDevice {
    /// Loads the embedded code objects of offline config `config` (a name from
    /// `kernels/gpu/offline_configs.txt`), trying each architecture until the runtime accepts one,
    /// and resolves every kernel the object exports.
    pub fn load(self: &Arc<Self>, config: &str) -> Result<LoadedModule, RocmError> {
        let objects: Vec<_> =
            CODE_OBJECTS.iter().filter(|object| object.config == config).collect();
        if objects.is_empty() {
            return Err(RocmError::ConfigNotEmbedded {
                config: config.to_owned(),
                embedded: crate::code_objects::configs().join(", "),
            });
        }
        let api = self.runtime.api();
        self.make_current()?;
        let mut refused = Vec::new();
        for object in objects {
            // The runtime parses the image in place; an 8-byte-aligned copy keeps its ELF reads
            // aligned whatever the alignment of the embedded bytes.
            let mut image = vec![0u64; object.elf.len().div_ceil(8)];
            copy_into_words(&mut image, object.elf);
            let mut module: Handle = std::ptr::null_mut();
            // SAFETY: `hipModuleLoadData` reads a complete code object from `image` (the whole ELF,
            // copied above; kept by the module, so alive as long as it is loaded, whether or not
            // a runtime copies it) and writes one handle into `module`.
            let status = unsafe { (api.hipModuleLoadData)(&mut module, image.as_ptr().cast()) };
            match self.runtime.check("hipModuleLoadData", status) {
                Ok(()) => {
                    let mut loaded = LoadedModule {
                        device: Arc::clone(self),
                        module,
                        arch: object.arch,
                        kernels: Vec::new(),
                        _image: image,
                    };
                    let names = object.inspect().map(|info| info.kernels).unwrap_or_default();
                    for name in names {
                        let function = loaded.function(&name)?;
                        loaded.kernels.push((name, function));
                    }
                    return Ok(loaded);
                }
                Err(error) => refused.push(format!("{}: {}", object.arch, error.name)),
            }
        }
        Err(RocmError::NoCodeObjectForDevice {
            config: config.to_owned(),
            archs: refused.join(", "),
        })
    }
}

impl LoadedModule {
    fn function(&self, name: &str) -> Result<Handle, RocmError> {
        // Names come from the object's string table, read up to the first NUL, so they hold none;
        // were one to, the empty name would make the runtime answer "not found", not a panic.
        let name_c = CString::new(name).unwrap_or_default();
        let mut function: Handle = std::ptr::null_mut();
        // SAFETY: `module` is a loaded module (unloaded only on drop); `name_c` is NUL-terminated
        // and alive for the call; one handle is written into `function`.
        let status = unsafe {
            (self.device.runtime.api().hipModuleGetFunction)(
                &mut function,
                self.module,
                name_c.as_ptr(),
            )
        };
        self.device.runtime.check("hipModuleGetFunction", status)?;
        Ok(function)
    }

    /// The device it is loaded on.
    pub fn device(&self) -> &Arc<RocmDevice> {
        &self.device
    }

    /// The architecture whose code object the runtime accepted.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The kernels resolved, by name.
    pub fn kernels(&self) -> impl Iterator<Item = &str> {
        self.kernels.iter().map(|(name, _)| name.as_str())
    }

    /// The handle of kernel `name`, which the object exports.
    pub(crate) fn kernel(&self, name: &str) -> Result<Handle, RocmError> {
        self.kernels
            .iter()
            .find(|(kernel, _)| kernel == name)
            .map(|(_, function)| *function)
            .ok_or_else(|| RocmError::MissingKernel(name.to_owned()))
    }
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // SAFETY: `module` came from `hipModuleLoadData`, is unloaded exactly once (here), and no
        // function handle of it outlives `self`. A failure cannot be reported from drop and
        // leaves nothing unsafe behind, so it is ignored.
        let _ = unsafe { (self.device.runtime.api().hipModuleUnload)(self.module) };
    }
}

/// Copies `bytes` into the front of `words`, which holds at least `bytes.len()` bytes.
fn copy_into_words(words: &mut [u64], bytes: &[u8]) {
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut padded = [0u8; 8];
        padded[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(padded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aligned_copy_holds_every_byte_and_zero_padding() {
        let bytes: Vec<u8> = (1..=11).collect();
        let mut words = vec![u64::MAX; bytes.len().div_ceil(8)];
        copy_into_words(&mut words, &bytes);
        let copied: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&copied[..11], &bytes[..]);
        assert_eq!(&copied[11..], &[0, 0, 0, 0, 0]);
    }
}
