//! Imports DLPack descriptors with fuzzed metadata. Whatever the fields say, the import must either
//! succeed with a tensor that reads the producer's buffer in bounds, or fail with a typed error;
//! either way the producer's deleter runs exactly once.
#![no_main]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use sluice_tensor::reexports::dlpark::ffi::{DLDataType, DLDataTypeCode, DLDevice, DLDeviceType};
use sluice_tensor::reexports::dlpark::metadata::Dynamic;
use sluice_tensor::{DType, Tensor};

const BUFFER_WORDS: usize = 512;

/// The producer's allocation; its drop is the deleter running.
struct Producer {
    buffer: Vec<u64>,
    drops: Arc<AtomicUsize>,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reads fuzz bytes as a stream of small integers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    /// Mostly small values (realistic extents), sometimes raw 64-bit ones (hostile extents).
    fn extent(&mut self) -> i64 {
        match self.byte() {
            0..=199 => i64::from(self.byte() % 9) - 1,
            200..=249 => i64::from(self.byte()),
            _ => i64::from_le_bytes(std::array::from_fn(|_| self.byte())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let rank = usize::from(input.byte() % 5);
    let shape: Vec<i64> = (0..rank).map(|_| input.extent()).collect();
    let strides: Vec<i64> = (0..rank).map(|_| input.extent()).collect();
    let drops = Arc::new(AtomicUsize::new(0));
    let producer =
        Producer { buffer: vec![0x3f80_0000_3f80_0000; BUFFER_WORDS], drops: drops.clone() };
    let base = producer.buffer.as_ptr().cast::<u8>();
    let Ok(mut init) = Dynamic::new(shape, strides).initialize(Box::new(producer)) else {
        return;
    };
    let data_ptr = match input.byte() % 4 {
        0 => std::ptr::null(),
        1 => base.wrapping_add(usize::from(input.byte() % 8)),
        _ => base,
    };
    let dtype = match input.byte() % 4 {
        0 => DLDataType::new(DLDataTypeCode(input.byte() % 20), input.byte(), 1),
        1 => DLDataType::new(DLDataTypeCode::FLOAT, 32, u16::from(input.byte() % 3)),
        _ => DType::ALL[usize::from(input.byte()) % DType::ALL.len()].to_dlpack(),
    };
    let device = match input.byte() % 4 {
        0 => DLDevice { device_type: DLDeviceType(u32::from(input.byte() % 20)), device_id: -1 },
        _ => DLDevice::CPU,
    };
    let byte_offset = match input.byte() % 4 {
        0 => u64::from_le_bytes(std::array::from_fn(|_| input.byte())),
        _ => u64::from(input.byte()),
    };
    init.set_data(data_ptr.cast_mut().cast())
        .set_dtype(dtype)
        .set_device(device)
        .set_byte_offset(byte_offset);
    let mutation = input.byte();
    // SAFETY: the descriptor's shape/strides arrays are the ones dlpark allocated for `rank`
    // entries; the data pointer is null or inside the producer's buffer, which lives until the
    // deleter runs. Fields that lie about the buffer are exactly what the import must catch.
    let managed = unsafe { init.finish() };
    let raw = managed.into_raw();
    // SAFETY: `raw` is the live managed tensor just produced and exclusively owned here.
    unsafe {
        match mutation % 8 {
            0 => (*raw).dl_tensor.strides = std::ptr::null_mut(),
            1 => (*raw).version.minor = u32::from(mutation % 4),
            2 => (*raw).dl_tensor.ndim = -i32::from(mutation),
            3 => (*raw).dl_tensor.shape = std::ptr::null_mut(),
            4 => (*raw).version.major = u32::from(mutation % 3),
            _ => {}
        }
    }
    // SAFETY: ownership moves to the import; the shape and strides pointers are null or point to
    // `rank` values, and a negative ndim is refused before they are read.
    let imported = unsafe { Tensor::from_raw_dlpack(raw) };
    if let Ok(tensor) = imported {
        let size = tensor.dtype().size_in_bytes();
        let bytes = tensor.elem_count().saturating_mul(size);
        let start = tensor.data_ptr() as usize;
        let end = tensor.layout().span().saturating_sub(tensor.offset()).saturating_mul(size);
        let inside =
            start >= base as usize && start.saturating_add(end) <= base as usize + BUFFER_WORDS * 8;
        // Only read what fits the producer's buffer, and never ask for more than a small copy.
        if tensor.device().is_cpu() && (bytes == 0 || inside) && bytes <= 1 << 20 {
            let _ = match tensor.dtype() {
                DType::F32 => tensor.to_vec::<f32>().map(|v| v.len()),
                DType::I64 => tensor.to_vec::<i64>().map(|v| v.len()),
                DType::U8 => tensor.to_vec::<u8>().map(|v| v.len()),
                _ => Ok(0),
            };
        }
        drop(tensor);
    }
    assert_eq!(drops.load(Ordering::SeqCst), 1, "the producer's deleter must run exactly once");
});
