//! The PTX that NVRTC makes for a routing config, kept on disk between processes. NVRTC takes
//! seconds for each config (4.7 s for DeepSeek-V3's with NVRTC 13.5), which an engine pays at
//! every start-up and a test suite for every config it prepares; the driver keeps its own cache of
//! the machine code it makes from the PTX.
//!
//! Where: `$SLUICE_KERNEL_CACHE` (`off` or empty: no cache), else `$XDG_CACHE_HOME/sluice/kernels`,
//! else `$HOME/.cache/sluice/kernels`. An entry is named by a hash of what its PTX depends on (the
//! NVRTC version, the options, the source) and begins with all of that written out, which a read
//! compares in full: another key is a miss, never another config's kernels. An entry is written to
//! a file of its own and renamed into place, so no reader sees part of one. A failure to read or
//! write is a miss (logged), never an error: the cache only saves time.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that names the cache's folder, or turns it `off`.
pub(crate) const CACHE_VAR: &str = "SLUICE_KERNEL_CACHE";

/// Written before the rest of an entry's key (its format; a new one is a miss for the old).
const FORMAT: &str = "sluice ptx cache 1";
/// Between an entry's key and its PTX.
const KEY_END: &str = "\n--- ptx ---\n";

/// Everything the PTX of one compilation depends on, written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PtxKey {
    text: String,
}

impl PtxKey {
    /// The key of compiling `source` with `options` by NVRTC `major.minor`. The source enters as
    /// its length and hash: it is the one embedded in this build, so two builds whose sources
    /// differ and hash alike would have to also agree on the length.
    pub(crate) fn new(nvrtc: (i32, i32), options: &[String], source: &str) -> Self {
        let mut text = format!("{FORMAT}\nnvrtc {}.{}\n", nvrtc.0, nvrtc.1);
        for option in options {
            // An option is one line of the key: a newline inside one is written escaped.
            let _ = writeln!(text, "option {}", option.escape_debug());
        }
        let _ =
            write!(text, "source {} bytes, fnv-1a {:016x}", source.len(), fnv1a(source.as_bytes()));
        PtxKey { text }
    }

    /// The entry's file name: the key's hash.
    fn file_name(&self) -> String {
        format!("{:016x}.ptx", fnv1a(self.text.as_bytes()))
    }
}

/// The 64-bit FNV-1a hash of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The folder of PTX entries (or none: no cache), for the NVRTC this process loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PtxCache {
    dir: Option<PathBuf>,
    /// NVRTC's version, `(major, minor)`.
    nvrtc: (i32, i32),
}

impl PtxCache {
    /// The cache the environment names (see the module's documentation), for NVRTC `nvrtc`;
    /// none where NVRTC's version is unknown.
    pub(crate) fn from_env(nvrtc: Option<(i32, i32)>) -> Self {
        let dir = nvrtc.and_then(|_| cache_dir(|name| std::env::var_os(name)));
        PtxCache { dir, nvrtc: nvrtc.unwrap_or((0, 0)) }
    }

    /// A cache in `dir`, or none.
    #[cfg(test)]
    fn at(dir: Option<PathBuf>) -> Self {
        PtxCache { dir, nvrtc: (13, 0) }
    }

    /// The key of compiling `source` with `options` by this cache's NVRTC.
    pub(crate) fn key(&self, options: &[String], source: &str) -> PtxKey {
        PtxKey::new(self.nvrtc, options, source)
    }

    /// The PTX of `key`: the entry's, where it holds `key`; else what `compile` returns, stored
    /// for the next time where `compile` succeeds.
    pub(crate) fn get_or_compile<E>(
        &self,
        key: &PtxKey,
        compile: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        let Some(dir) = &self.dir else { return compile() };
        let path = dir.join(key.file_name());
        match read_entry(&path, key) {
            Ok(Some(ptx)) => {
                tracing::debug!(path = %path.display(), "kernels from the PTX cache");
                return Ok(ptx);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "PTX cache entry not read");
            }
        }
        let ptx = compile()?;
        if let Err(error) = write_entry(dir, &path, key, &ptx) {
            tracing::warn!(dir = %dir.display(), %error, "PTX cache entry not written");
        }
        Ok(ptx)
    }
}

/// The cache's folder from the environment `var` reads.
fn cache_dir(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(dir) = var(CACHE_VAR) {
        return (!dir.is_empty() && dir != "off").then(|| PathBuf::from(dir));
    }
    let base = match var("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(var("HOME").filter(|dir| !dir.is_empty())?).join(".cache"),
    };
    Some(base.join("sluice").join("kernels"))
}

/// The PTX of the entry at `path` if it holds `key`; `None` if there is none or it holds another.
fn read_entry(path: &Path, key: &PtxKey) -> std::io::Result<Option<String>> {
    let entry = match std::fs::read(path) {
        Ok(entry) => entry,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let Ok(entry) = String::from_utf8(entry) else { return Ok(None) };
    let ptx = entry.strip_prefix(key.text.as_str()).and_then(|rest| rest.strip_prefix(KEY_END));
    Ok(ptx.filter(|ptx| !ptx.is_empty()).map(str::to_owned))
}

/// Writes the entry of `key` and `ptx` at `path` in `dir`: to a file of its own first, then
/// renamed into place.
fn write_entry(dir: &Path, path: &Path, key: &PtxKey, ptx: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let partial = dir.join(format!(".{}.{}.{nanos}", key.file_name(), std::process::id()));
    let written = std::fs::write(&partial, format!("{}{KEY_END}{ptx}", key.text))
        .and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A folder of its own under the system's temporary folder, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("sluice-ptx-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn key(options: &[&str], source: &str) -> PtxKey {
        PtxKey::new((13, 0), &options.iter().map(|o| o.to_string()).collect::<Vec<_>>(), source)
    }

    /// `cache.get_or_compile(key)` with a compiler that returns `ptx`, and whether it ran.
    fn get(cache: &PtxCache, key: &PtxKey, ptx: &str) -> (String, bool) {
        let ran = Cell::new(false);
        let got = cache.get_or_compile(key, || {
            ran.set(true);
            Ok::<_, ()>(ptx.to_owned())
        });
        (got.unwrap(), ran.get())
    }

    #[test]
    fn a_config_compiles_once_then_comes_from_the_cache() {
        let dir = TempDir::new("once");
        let cache = PtxCache::at(Some(dir.0.join("kernels")));
        let v3 = key(&["--gpu-architecture=sm_90a", "-DSLUICE_E=256"], "source");
        assert_eq!(get(&cache, &v3, ".version 8.8 v3"), (".version 8.8 v3".into(), true));
        assert_eq!(get(&cache, &v3, "unused"), (".version 8.8 v3".into(), false));
        // Another option, NVRTC or source is another entry, compiled.
        let kimi = key(&["--gpu-architecture=sm_90a", "-DSLUICE_E=384"], "source");
        let newer = PtxKey::new((13, 1), &["--gpu-architecture=sm_90a".into()], "source");
        let edited = key(&["--gpu-architecture=sm_90a", "-DSLUICE_E=256"], "source!");
        for other in [kimi, newer, edited] {
            assert_ne!(other.file_name(), v3.file_name());
            assert_eq!(get(&cache, &other, "other"), ("other".into(), true));
        }
        assert_eq!(get(&cache, &v3, "unused"), (".version 8.8 v3".into(), false));
        // Nothing but the entries is left in the folder.
        let names = std::fs::read_dir(dir.0.join("kernels")).unwrap().count();
        assert_eq!(names, 4);
    }

    #[test]
    fn an_entry_of_another_key_or_a_damaged_one_is_a_miss_and_is_replaced() {
        let dir = TempDir::new("damaged");
        let cache = PtxCache::at(Some(dir.0.clone()));
        let v3 = key(&["-DSLUICE_E=256"], "source");
        let path = dir.0.join(v3.file_name());
        std::fs::create_dir_all(&dir.0).unwrap();
        // Another key under this key's name (a hash collision), a cut entry, bytes that are
        // not text, and an entry with no PTX.
        let other = key(&["-DSLUICE_E=384"], "source");
        for damaged in [
            format!("{}{KEY_END}kimi's ptx", other.text).into_bytes(),
            v3.text.as_bytes()[..20].to_vec(),
            vec![0xff, 0xfe, 0x00],
            format!("{}{KEY_END}", v3.text).into_bytes(),
        ] {
            std::fs::write(&path, damaged).unwrap();
            assert_eq!(get(&cache, &v3, "v3's ptx"), ("v3's ptx".into(), true));
            assert_eq!(get(&cache, &v3, "unused"), ("v3's ptx".into(), false));
        }
    }

    #[test]
    fn without_a_usable_folder_every_config_is_compiled() {
        let none = PtxCache::at(None);
        let v3 = key(&[], "source");
        assert_eq!(get(&none, &v3, "a"), ("a".into(), true));
        assert_eq!(get(&none, &v3, "b"), ("b".into(), true));
        // A folder that cannot be made (a file stands in its way): compiled, not an error.
        let dir = TempDir::new("blocked");
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join("file"), "").unwrap();
        let blocked = PtxCache::at(Some(dir.0.join("file").join("kernels")));
        assert_eq!(get(&blocked, &v3, "a"), ("a".into(), true));
        assert_eq!(get(&blocked, &v3, "b"), ("b".into(), true));
        // A failed compilation is returned as it is, and stores nothing.
        let cache = PtxCache::at(Some(dir.0.join("kernels")));
        assert_eq!(cache.get_or_compile(&v3, || Err::<String, _>("refused")), Err("refused"));
        assert_eq!(get(&cache, &v3, "c"), ("c".into(), true));
    }

    /// `cache_dir` in an environment of `pairs` alone.
    fn dir_in(pairs: &[(&str, &str)]) -> Option<PathBuf> {
        cache_dir(|name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v)))
    }

    #[test]
    fn the_folder_comes_from_the_environment() {
        let home = ("HOME", "user-home");
        let in_home = ["user-home", ".cache", "sluice", "kernels"].iter().collect::<PathBuf>();
        assert_eq!(dir_in(&[home]), Some(in_home));
        let xdg = ("XDG_CACHE_HOME", "xdg-cache");
        let in_xdg = ["xdg-cache", "sluice", "kernels"].iter().collect::<PathBuf>();
        assert_eq!(dir_in(&[home, xdg]), Some(in_xdg));
        assert_eq!(dir_in(&[home, xdg, (CACHE_VAR, "named")]), Some("named".into()));
        assert_eq!(dir_in(&[home, (CACHE_VAR, "off")]), None);
        assert_eq!(dir_in(&[home, (CACHE_VAR, "")]), None);
        assert_eq!(dir_in(&[("XDG_CACHE_HOME", "")]), None, "no home, no cache");
    }

    #[test]
    fn an_option_is_one_line_of_the_key() {
        let split = key(&["-DA=1\noption -DB=2"], "s");
        let two = key(&["-DA=1", "-DB=2"], "s");
        assert_ne!(split, two);
    }
}
