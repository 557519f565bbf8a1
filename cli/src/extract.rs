//! `sluice extract-gates`: a checkpoint folder holding only the MoE gates of another.
//!
//! The copy reads nothing but the gate tensors' bytes, one tensor mapped at a time, so it needs
//! memory for the largest of them and not for the files; it writes into a hidden sibling folder,
//! reopens and checks what it wrote, and renames the folder into place only then.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hasher};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::json;
use sluice_models::{CONFIG_FILE, Checkpoint, MoeGate, SHARD_INDEX, SINGLE_FILE, TensorLocation};

use crate::error::CliError;
use crate::gates::{Gates, ranges};
use crate::io;

/// Arguments of `sluice extract-gates`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The checkpoint to extract from (config.json + safetensors, single file or sharded).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The folder to create (it must not exist yet).
    #[arg(long)]
    pub output: PathBuf,
    /// The MoE layers whose gates to extract, e.g. `3,5-7` (default: every MoE layer).
    #[arg(long, value_parser = parse_layers)]
    pub layers: Option<LayerList>,
    /// Above this size the gates are split into shards with a `model.safetensors.index.json`
    /// (bytes, or with a unit: 500MB, 5GB).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
}

/// Layers from the command line, sorted, without repeats.
#[derive(Debug, Clone)]
pub struct LayerList(Vec<usize>);

/// `3,5-7` as layers 3, 5, 6, 7.
fn parse_layers(text: &str) -> Result<LayerList, String> {
    let number = |s: &str| {
        s.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a layer number in `{text}`"))
    };
    let mut layers = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(format!("`{part}` is an empty range"));
                }
                layers.extend(first..=last);
            }
            None => layers.push(number(part)?),
        }
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(LayerList(layers))
}

/// `5GB`, `500MB`, `64KB` (powers of 1000, as Hugging Face writes shard sizes) or plain bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let upper = text.trim().to_ascii_uppercase();
    let (digits, unit) = match upper.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => upper.split_at(at),
        None => (upper.as_str(), ""),
    };
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("`{text}`: expected bytes or a size like 500MB or 5GB")),
    };
    let size = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("`{text}` is not a size"))?;
    if size == 0 {
        return Err("the shard size must be above zero".to_owned());
    }
    Ok(size)
}

/// Extracts the gates, checks the copy and renames it into place.
pub fn run(args: &ExtractArgs) -> Result<(), CliError> {
    let source = Checkpoint::open(&args.checkpoint)?;
    let staging = Staging::create(&args.output)?;
    // The gates are loaded to check them (names, shapes, dtypes, bias) before anything is
    // copied; loading reads headers only, and they are dropped before the copy.
    let layers: Vec<usize> = match &args.layers {
        Some(LayerList(layers)) => Gates::load(&source, layers.iter().copied())?
            .require_all(source.dir(), "leave them out of --layers")?,
        None => Gates::load_all(&source)?
            .require_all(source.dir(), "choose the layers that are present with --layers")?,
    }
    .iter()
    .map(MoeGate::layer)
    .collect();
    if layers.is_empty() {
        return Err(CliError::Input(format!(
            "{}: the model has no MoE layer, so no gate to extract",
            source.dir().display()
        )));
    }
    let mut tensors = Vec::new();
    for &layer in &layers {
        let names = MoeGate::find_tensor_names(&source, layer)?;
        for name in names.all() {
            if source.contains(name)? {
                tensors.push(source.tensor_location(name)?);
            }
        }
    }
    let total: usize = tensors.iter().map(|t| t.range.len()).sum();
    tracing::info!(layers = %ranges(&layers), tensors = tensors.len(), bytes = total, "extracting");

    let config = fs::read(source.dir().join(CONFIG_FILE))
        .map_err(|e| CliError::Io { path: source.dir().join(CONFIG_FILE), source: e })?;
    io::write_atomically(&staging.path.join(CONFIG_FILE), &config)?;

    let shards = split_into_shards(tensors, args.max_shard_size);
    let mut progress = Progress::new(total);
    let mut copied = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if shards.len() == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        };
        copied.extend(write_shard(&staging.path.join(&file_name), shard, &mut progress)?);
        weight_map.extend(shard.iter().map(|t| (t.name.clone(), file_name.clone())));
    }
    if shards.len() > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| CliError::Input(format!("cannot encode the shard index: {e}")))?;
        io::write_atomically(&staging.path.join(SHARD_INDEX), text.as_bytes())?;
    }
    progress.finish();

    verify(&staging.path, &layers, &copied)?;
    staging.commit()?;
    println!(
        "extracted {} of {} MoE gates ({} tensors, {:.1} MB, {}) from {} into {}",
        layers.len(),
        source.config().moe_layers().count(),
        copied.len(),
        total as f64 / 1e6,
        if shards.len() == 1 { "one file".to_owned() } else { format!("{} shards", shards.len()) },
        args.checkpoint.display(),
        args.output.display()
    );
    Ok(())
}

/// Groups the tensors, in order, into shards of at most `max_bytes` each; a tensor larger than
/// that gets a shard of its own, as Hugging Face does.
fn split_into_shards(tensors: Vec<TensorLocation>, max_bytes: u64) -> Vec<Vec<TensorLocation>> {
    let mut shards: Vec<Vec<TensorLocation>> = Vec::new();
    let mut current_bytes = 0u64;
    for tensor in tensors {
        let bytes = tensor.range.len() as u64;
        match shards.last_mut() {
            Some(shard) if current_bytes.saturating_add(bytes) <= max_bytes => {
                shard.push(tensor);
                current_bytes += bytes;
            }
            _ => {
                shards.push(vec![tensor]);
                current_bytes = bytes;
            }
        }
    }
    shards
}

/// One tensor as copied: where it came from, and a digest of its bytes to check the copy with.
struct Copied {
    source: TensorLocation,
    digest: u64,
}

/// Bytes copied or hashed per step: the unit of progress.
const CHUNK: usize = 8 << 20;

/// Writes one safetensors file holding `tensors`, copying each from its own mapping of the source
/// file, which is dropped (and its memory released) before the next is mapped.
fn write_shard(
    path: &Path,
    tensors: &[TensorLocation],
    progress: &mut Progress,
) -> Result<Vec<Copied>, CliError> {
    // Largest alignment first, then by name, like the safetensors writer: with a header padded
    // to 8 bytes every tensor then starts aligned for its dtype, so readers can map it in place.
    let mut ordered: Vec<&TensorLocation> = tensors.iter().collect();
    ordered.sort_by(|a, b| (Reverse(a.dtype), &a.name).cmp(&(Reverse(b.dtype), &b.name)));
    let mut offset = 0;
    let infos = ordered
        .iter()
        .map(|t| {
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.range.len()),
            };
            offset += t.range.len();
            (t.name.clone(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let invalid = |message: String| CliError::Safetensors { path: path.to_path_buf(), message };
    let header = Metadata::new(Some(format), infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let write_error = |source| CliError::Io { path: path.to_path_buf(), source };
    let mut file = File::create_new(path).map_err(write_error)?;
    file.write_all(&(header.len() as u64).to_le_bytes()).map_err(write_error)?;
    file.write_all(&header).map_err(write_error)?;
    let mut copied = Vec::with_capacity(ordered.len());
    for tensor in ordered {
        let bytes = tensor.map()?;
        let mut digest = DefaultHasher::new();
        for chunk in bytes.chunks(CHUNK) {
            file.write_all(chunk).map_err(write_error)?;
            digest.write(chunk);
            progress.advance(chunk.len());
        }
        copied.push(Copied { source: tensor.clone(), digest: digest.finish() });
    }
    file.sync_all().map_err(write_error)?;
    Ok(copied)
}

/// Reopens the written folder as a checkpoint: every extracted layer's gate must load (names,
/// shapes, dtypes, correction bias), the files must hold exactly the copied tensors, each with its
/// source's dtype and shape and the same bytes (compared by digest, one tensor mapped at a time).
fn verify(dir: &Path, layers: &[usize], copied: &[Copied]) -> Result<(), CliError> {
    let failed = |what: String| {
        CliError::Input(format!("{}: the written gates do not read back: {what}", dir.display()))
    };
    let written = Checkpoint::open(dir)?;
    for &layer in layers {
        MoeGate::load(&written, layer).map_err(|e| failed(e.to_string()))?;
    }
    let mut expected: Vec<&str> = copied.iter().map(|c| c.source.name.as_str()).collect();
    expected.sort_unstable();
    if written.tensor_names()? != expected {
        return Err(failed(format!("the files do not hold exactly {expected:?}")));
    }
    for Copied { source, digest } in copied {
        let location = written.tensor_location(&source.name)?;
        if (location.dtype, &location.shape) != (source.dtype, &source.shape) {
            return Err(failed(format!("`{}` changed dtype or shape", source.name)));
        }
        let bytes = location.map()?;
        let mut read_back = DefaultHasher::new();
        bytes.chunks(CHUNK).for_each(|chunk| read_back.write(chunk));
        if read_back.finish() != *digest {
            return Err(failed(format!("`{}` holds other bytes than the source", source.name)));
        }
    }
    tracing::info!(tensors = copied.len(), "checked the copy");
    Ok(())
}

/// The hidden folder the checkpoint is built in; removed, with everything in it, unless
/// [`commit`](Staging::commit) renames it into place.
struct Staging {
    path: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(target: &Path) -> Result<Self, CliError> {
        if target.symlink_metadata().is_ok() {
            return Err(CliError::Input(format!(
                "{}: already exists; extract-gates creates a new folder",
                target.display()
            )));
        }
        let parent = io::parent_dir(target);
        if !parent.is_dir() {
            return Err(CliError::Input(format!(
                "{}: the output folder {} does not exist",
                target.display(),
                parent.display()
            )));
        }
        let path = io::temporary_sibling(target);
        fs::create_dir(&path).map_err(|source| CliError::Io { path: path.clone(), source })?;
        Ok(Staging { path, target: target.to_path_buf(), committed: false })
    }

    /// Renames the finished folder to its target, and makes the rename durable.
    fn commit(mut self) -> Result<(), CliError> {
        let io_error = |source| CliError::Io { path: self.target.clone(), source };
        fs::rename(&self.path, &self.target).map_err(io_error)?;
        self.committed = true;
        File::open(io::parent_dir(&self.target)).and_then(|dir| dir.sync_all()).map_err(io_error)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error being reported already says what went wrong.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A progress line on stderr, drawn only when stderr is a terminal and the copy has taken long
/// enough to be worth watching; cleared before anything else is printed.
struct Progress {
    total: usize,
    done: usize,
    visible: bool,
    started: Instant,
    last_drawn: Option<Instant>,
}

impl Progress {
    /// Copies shorter than this show no progress at all.
    const DELAY: Duration = Duration::from_secs(1);
    const INTERVAL: Duration = Duration::from_millis(200);

    fn new(total: usize) -> Self {
        let visible = std::io::stderr().is_terminal();
        Progress { total, done: 0, visible, started: Instant::now(), last_drawn: None }
    }

    fn advance(&mut self, bytes: usize) {
        self.done += bytes;
        if !self.visible || self.started.elapsed() < Self::DELAY {
            return;
        }
        if self.last_drawn.is_some_and(|at| at.elapsed() < Self::INTERVAL) {
            return;
        }
        let percent = self.done as f64 * 100.0 / self.total.max(1) as f64;
        eprint!(
            "\r\x1b[2Kextracting gates: {:.1} of {:.1} MB ({percent:.0}%)",
            self.done as f64 / 1e6,
            self.total as f64 / 1e6
        );
        self.last_drawn = Some(Instant::now());
    }

    fn finish(&mut self) {
        if self.last_drawn.take().is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists_take_numbers_and_ranges() {
        assert_eq!(parse_layers("3").unwrap().0, [3]);
        assert_eq!(parse_layers("7,3-5,4").unwrap().0, [3, 4, 5, 7]);
        assert!(parse_layers("5-3").unwrap_err().contains("empty range"));
        assert!(parse_layers("3,x").unwrap_err().contains("`x`"));
        assert!(parse_layers("").is_err());
    }

    #[test]
    fn sizes_take_decimal_units() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500mb"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999GB").is_err());
    }

    fn location(name: &str, bytes: usize) -> TensorLocation {
        TensorLocation {
            name: name.to_owned(),
            path: PathBuf::from("model.safetensors"),
            dtype: safetensors::Dtype::BF16,
            shape: vec![bytes / 2],
            range: 0..bytes,
        }
    }

    #[test]
    fn shards_stay_under_the_size_and_oversized_tensors_stand_alone() {
        let tensors =
            vec![location("a", 40), location("b", 40), location("c", 200), location("d", 20)];
        let names = |shards: Vec<Vec<TensorLocation>>| -> Vec<Vec<String>> {
            shards.into_iter().map(|s| s.into_iter().map(|t| t.name).collect()).collect()
        };
        assert_eq!(
            names(split_into_shards(tensors.clone(), 100)),
            [vec!["a", "b"], vec!["c"], vec!["d"]]
        );
        assert_eq!(names(split_into_shards(tensors, 1000)), [vec!["a", "b", "c", "d"]]);
    }
}
