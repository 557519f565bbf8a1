//! Tensors across the Python door: [`import`] for what sluice reads, [`import_output`] for what it
//! writes, and [`PyTensor`], a sluice tensor that Python consumers import through `__dlpack__`.

use std::ffi::c_void;

use dlpark::ffi::{DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::python::consumer::stream;
use dlpark::python::{
    DlpackExporter, DlpackStream, ExportRequest, ImportRequest, ImportedDlpack, StreamArg,
    export_dlpack, from_dlpack,
};
use dlpark::{DlpackFlags, Managed};
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sluice_tensor::{Dlpack, DlpackError, Tensor};

use crate::errors;

/// Whether the producer says its tensor requires grad (`requires_grad`, as torch names it;
/// producers without autograd have no such attribute).
fn producer_requires_grad(object: &Bound<'_, PyAny>) -> PyResult<bool> {
    match object.getattr_opt("requires_grad")? {
        Some(flag) => flag.is_truthy(),
        None => Ok(false),
    }
}

/// Imports any DLPack producer (an object with `__dlpack__`, or a capsule) as a sluice tensor,
/// zero-copy, with the producer's `requires_grad`.
///
/// The flag is read from the object because no DLPack path can be counted on to refuse a tensor
/// that requires grad: torch's `__dlpack__` raises `BufferError` for one, but its C exchange API,
/// which is tried first, hands it over without a word. Such a tensor's memory is taken from the
/// producer's own `detach()` (storage-sharing in torch, so still zero-copy) and the sluice tensor
/// gets the flag: sluice's bridge then refuses to re-export it, and only a gate, which detaches at
/// the door, routes it.
pub(crate) fn import(object: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let requires_grad = producer_requires_grad(object)?;
    let source = match object.getattr_opt("detach")? {
        Some(detach) if requires_grad => detach.call0()?,
        _ => object.clone(),
    };
    let tensor = match imported(&source)? {
        ImportedDlpack::Versioned(managed) => Tensor::from_dlpack(managed),
        ImportedDlpack::Legacy(managed) => Tensor::from_dlpack_legacy(managed),
    }
    .map_err(errors::dlpack)?;
    Ok(tensor.with_requires_grad(requires_grad))
}

/// The consumer stream sluice names to device producers: none to wait for (`stream=-1`).
///
/// sluice's device calls only enqueue on the caller's stream, whose contract has the inputs ready
/// there (torch's own work is, on the current stream the `sluice` package passes). Asked for no
/// stream, some torch versions order the tensor on the legacy default stream instead, making it
/// wait for the current one: needless outside a CUDA graph capture, and refused inside one.
struct OrderedByTheCaller;

// SAFETY: no stream handle is handed out: `-1` asks the producer not to synchronise at all.
unsafe impl DlpackStream for OrderedByTheCaller {
    fn as_python_arg(&self, _py: Python<'_>, _device: DLDevice) -> PyResult<StreamArg> {
        Ok(stream::no_sync())
    }

    /// The C exchange API's tensor is used as it is, for the same reason.
    unsafe fn wait_for_producer(
        &self,
        _device: DLDevice,
        _producer: *mut c_void,
    ) -> PyResult<bool> {
        Ok(true)
    }
}

/// The producer's tensor through the first DLPack path it offers (dlpark's order: the C exchange
/// API, `__dlpack__(max_version=...)`, a bare `__dlpack__()` when there is no
/// `__dlpack_device__`), asking a device producer for no synchronisation (see
/// [`OrderedByTheCaller`]). A producer that has `__dlpack_device__` but predates DLPack 1.0
/// rejects the `max_version` keyword with a `TypeError`; as the array API asks of consumers, it is
/// asked again without it, for the legacy capsule it can make.
fn imported(object: &Bound<'_, PyAny>) -> PyResult<ImportedDlpack> {
    let request = ImportRequest::new(object.as_borrowed())?;
    // Capsules and legacy producers have no device to ask about, nor a stream to take.
    let on_device = request
        .device()
        .is_ok_and(|device| matches!(device.device_type, DLDeviceType::CUDA | DLDeviceType::ROCM));
    let stream: Option<&dyn DlpackStream> =
        if on_device { Some(&OrderedByTheCaller) } else { None };
    match request.import(stream, None) {
        Err(error)
            if error.is_instance_of::<PyTypeError>(object.py())
                && object.hasattr("__dlpack_device__")? =>
        {
            let capsule = if on_device {
                let no_sync = PyDict::new(object.py());
                no_sync.set_item("stream", -1)?;
                object.call_method("__dlpack__", (), Some(&no_sync))?
            } else {
                object.call_method0("__dlpack__")?
            };
            from_dlpack(capsule.as_borrowed(), None, None)
        }
        result => result,
    }
}

/// Imports a tensor that sluice will write into, zero-copy.
///
/// It must come as versioned DLPack (1.x): only its flags say whether the producer allows writes
/// (the writable view refuses `READ_ONLY`). A tensor that requires grad is refused like an export,
/// since writing into it would bypass the producer's autograd.
pub(crate) fn import_output(object: &Bound<'_, PyAny>, name: &str) -> PyResult<Dlpack> {
    if producer_requires_grad(object)? {
        return Err(PyBufferError::new_err(format!("`{name}`: {}", DlpackError::RequiresGrad)));
    }
    match imported(object)? {
        ImportedDlpack::Versioned(managed) => Ok(managed),
        ImportedDlpack::Legacy(_) => Err(PyValueError::new_err(format!(
            "`{name}` came as a legacy DLPack tensor; outputs need versioned DLPack (1.x), whose \
             flags say whether the memory may be written"
        ))),
    }
}

/// A sluice tensor, handed to Python consumers through DLPack (`torch.from_dlpack(t)`).
///
/// Exports go through sluice's bridge: a tensor that requires grad is refused with `BufferError`
/// and sluice's message; [`detach`](PyTensor::detach) shares the storage and is exportable.
#[pyclass(frozen, module = "sluice._sluice", name = "Tensor")]
pub(crate) struct PyTensor {
    pub(crate) inner: Tensor,
}

impl From<Tensor> for PyTensor {
    fn from(inner: Tensor) -> Self {
        PyTensor { inner }
    }
}

#[pymethods]
impl PyTensor {
    /// Imports any DLPack producer, zero-copy, keeping its `requires_grad`.
    #[staticmethod]
    fn from_dlpack(object: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(import(object)?.into())
    }

    /// Whether the tensor requires grad (exports are refused while it does).
    #[getter]
    fn requires_grad(&self) -> bool {
        self.inner.requires_grad()
    }

    /// The same storage without `requires_grad` (O(1), no copy).
    fn detach(&self) -> Self {
        self.inner.detach().into()
    }

    /// The extents.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.inner.shape().to_vec()
    }

    /// The strides, in elements.
    #[getter]
    fn strides(&self) -> Vec<usize> {
        self.inner.strides().to_vec()
    }

    /// The element type's name (`f32`, `bf16`, `i32`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }

    /// The address of the first element, to compare with a producer's (`tensor.data_ptr()`).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.inner.data_ptr() as usize
    }

    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> PyResult<(u32, i32)> {
        Ok(DlpackExporter::device(self).into())
    }

    fn __repr__(&self) -> String {
        format!(
            "sluice.Tensor(shape={:?}, dtype={}, device={}, requires_grad={})",
            self.inner.shape(),
            self.inner.dtype(),
            self.inner.device(),
            if self.inner.requires_grad() { "True" } else { "False" }
        )
    }
}

impl DlpackExporter for PyTensor {
    fn device(&self) -> DLDevice {
        // A tensor's device came through DLPack or is the host, so it has a DLPack device; the
        // host stands in for an ordinal too large for DLPack, which the export itself refuses.
        self.inner.device().to_dlpack().unwrap_or(DLDevice::CPU)
    }

    fn flags(&self) -> DlpackFlags {
        // The bridge marks every export read-only: the storage stays shared with sluice.
        DlpackFlags::READ_ONLY
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        // Host memory, or device memory whose producing work the importer already waited for:
        // there is nothing to order on the consumer's stream.
        Ok(())
    }

    /// Not reached through `__dlpack__`: dlpark refuses a legacy request for a read-only tensor
    /// before asking, since legacy DLPack cannot carry the flag. A correct export all the same.
    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.inner.to_dlpack_legacy().map_err(errors::dlpack)
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.inner.to_dlpack().map_err(errors::dlpack)
    }
}
