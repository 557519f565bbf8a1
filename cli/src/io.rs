//! Reading hidden states from, and writing routings to, safetensors files.
//!
//! Outputs are written to a temporary file in the destination folder and renamed into place, so a
//! failure at any point leaves nothing at the output path.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};
use sluice_models::SafetensorsBytes;
use sluice_tensor::{DType, Tensor};

use crate::error::CliError;

/// The tensor `route` reads from its input file.
pub const HIDDEN_STATES: &str = "hidden_states";
/// The optional tensor of token ids beside it, which hash-routed layers need.
pub const INPUT_IDS: &str = "input_ids";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { path: path.to_path_buf(), source }
}

/// Reads `hidden_states` `[T, H]` (f32, bf16 or f16) from a safetensors file: parsed and
/// validated like a checkpoint file, and used in place (no second copy of the data).
///
/// Also returns `input_ids` `[T]` (int32 or int64) when the file holds it.
pub fn read_hidden_states(path: &Path) -> Result<(Tensor, Option<Tensor>), CliError> {
    let bytes = fs::read(path).map_err(io_error(path))?;
    let file = SafetensorsBytes::parse(Arc::new(bytes), path)?;
    let input_ids = file.tensor(INPUT_IDS)?;
    let hidden = file.tensor(HIDDEN_STATES)?.ok_or_else(|| {
        CliError::Input(format!("{}: has no tensor named `{HIDDEN_STATES}`", path.display()))
    })?;
    if !matches!(hidden.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(CliError::Input(format!(
            "{}: `{HIDDEN_STATES}` has dtype {}; expected f32, bf16 or f16",
            path.display(),
            hidden.dtype()
        )));
    }
    if hidden.rank() != 2 {
        return Err(CliError::Input(format!(
            "{}: `{HIDDEN_STATES}` has shape {:?}; expected [tokens, hidden_size]",
            path.display(),
            hidden.shape()
        )));
    }
    if let Some(ids) = &input_ids {
        let tokens = hidden.shape()[0];
        if !matches!(ids.dtype(), DType::I32 | DType::I64) || ids.shape() != [tokens] {
            return Err(CliError::Input(format!(
                "{}: `{INPUT_IDS}` is {} {:?}; expected int32 or int64 [{tokens}] (one token id \
                 per row of `{HIDDEN_STATES}`)",
                path.display(),
                ids.dtype(),
                ids.shape()
            )));
        }
    }
    Ok((hidden, input_ids))
}

/// One named tensor to write.
pub struct Output<'a> {
    /// Name in the file.
    pub name: String,
    /// The tensor (host, contiguous, i32 or f32).
    pub tensor: &'a Tensor,
}

/// Fails early if `path` cannot be an output file: its folder must exist.
pub fn check_output_path(path: &Path) -> Result<(), CliError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(CliError::Input(format!(
            "{}: the output folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    if path.is_dir() {
        return Err(CliError::Input(format!("{}: is a folder, not a file", path.display())));
    }
    Ok(())
}

/// The folder `path` is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `outputs` to `path` as safetensors, atomically.
pub fn write_safetensors(path: &Path, outputs: &[Output<'_>]) -> Result<(), CliError> {
    let mut views = Vec::with_capacity(outputs.len());
    for output in outputs {
        let (dtype, bytes) = match output.tensor.dtype() {
            DType::I32 => (Dtype::I32, as_bytes(output.tensor.as_slice::<i32>()?)),
            DType::F32 => (Dtype::F32, as_bytes(output.tensor.as_slice::<f32>()?)),
            other => {
                return Err(CliError::Input(format!("cannot write {} tensors", other.name())));
            }
        };
        let view = TensorView::new(dtype, output.tensor.shape().to_vec(), bytes).map_err(|e| {
            CliError::Safetensors { path: path.to_path_buf(), message: e.to_string() }
        })?;
        views.push((output.name.clone(), view));
    }
    let serialized = safetensors::serialize(views, None)
        .map_err(|e| CliError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    write_atomically(path, &serialized)
}

/// Where to build `path` (a file or a folder) before renaming it into place: a hidden sibling in
/// the same folder, so that the rename stays on one file system, named after this process.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_dir(path).join(format!(".{file_name}.{}.partial", std::process::id()))
}

/// Writes to a temporary sibling file, syncs it, and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let temp = temporary_sibling(path);
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&temp);
        return Err(CliError::Io { path: path.to_path_buf(), source });
    }
    Ok(())
}

/// The bytes of a slice of plain numbers, in native (little-endian on supported hosts) order.
fn as_bytes<T: sluice_tensor::Element>(values: &[T]) -> &[u8] {
    // SAFETY: `Element` types are plain old data without padding, so the slice's memory is
    // `size_of_val(values)` initialised bytes, borrowed for the same lifetime.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        let ids = Tensor::from_vec(vec![3i32, 1, 2, 0], &[2, 2]).unwrap();
        let weights = Tensor::from_vec(vec![0.75f32, 0.25, 0.5, 0.5], &[2, 2]).unwrap();
        write_safetensors(
            &path,
            &[
                Output { name: "topk_ids".into(), tensor: &ids },
                Output { name: "topk_weights".into(), tensor: &weights },
            ],
        )
        .unwrap();
        let bytes = fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.tensor("topk_ids").unwrap().dtype(), Dtype::I32);
        assert_eq!(file.tensor("topk_weights").unwrap().shape(), &[2, 2]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_output_folder_is_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("out.safetensors");
        let message = check_output_path(&path).unwrap_err().to_string();
        assert!(message.contains("does not exist"), "{message}");
        assert!(check_output_path(&dir.path().join("fine.safetensors")).is_ok());
    }

    #[test]
    fn hidden_states_must_be_a_float_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        let data = [0u8; 12];
        let view = TensorView::new(Dtype::I32, vec![3], &data).unwrap();
        fs::write(&path, safetensors::serialize([(HIDDEN_STATES, view)], None).unwrap()).unwrap();
        let message = read_hidden_states(&path).unwrap_err().to_string();
        assert!(message.contains("dtype i32"), "{message}");
        fs::write(&path, b"not safetensors").unwrap();
        let message = read_hidden_states(&path).unwrap_err().to_string();
        assert!(message.contains("malformed safetensors"), "{message}");
    }
}
