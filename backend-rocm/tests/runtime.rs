//! Opening the HIP runtime: every way it can be missing is a typed error, never a panic or abort.
//!
//! CI installs Debian's `libamdhip64-5` on a machine without an AMD GPU and sets
//! `SLUICE_REQUIRE_HIP_RUNTIME`, so there the real library is loaded and must report "no device".

use sluice_backend_rocm::{
    HIP_ERROR_INVALID_DEVICE, HIP_ERROR_NO_DEVICE, HipRuntime, RocmDevice, RocmError,
    built_with_kernels,
};
use std::io::Write as _; // skips are written past the test harness's capture, to show in every run

#[test]
fn a_missing_library_is_no_library() {
    let tried = ["libamdhip64-that-does-not-exist.so.5".to_owned()];
    match HipRuntime::load_from(&tried) {
        Err(RocmError::NoLibrary { tried, .. }) => assert!(tried.contains("does-not-exist")),
        other => panic!("expected NoLibrary, got {other:?}"),
    }
}

#[test]
fn a_library_without_hip_symbols_is_a_missing_symbol() {
    // The C library loads everywhere this test runs and has none of HIP's functions.
    match HipRuntime::load_from(&["libc.so.6".to_owned()]) {
        Err(RocmError::MissingSymbol { symbol, library }) => {
            assert_eq!(symbol, "hipInit");
            assert_eq!(library, "libc.so.6");
        }
        other => panic!("expected MissingSymbol, got {other:?}"),
    }
}

#[test]
fn the_installed_runtime_loads_and_reports_its_devices() {
    let runtime = match HipRuntime::load() {
        Ok(runtime) => runtime,
        Err(error) => {
            assert!(
                std::env::var_os("SLUICE_REQUIRE_HIP_RUNTIME").is_none(),
                "SLUICE_REQUIRE_HIP_RUNTIME is set but the HIP runtime did not load: {error}"
            );
            assert!(matches!(error, RocmError::NoLibrary { .. }), "{error}");
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the_installed_runtime_loads_and_reports_its_devices: {error}"
            );
            return;
        }
    };
    assert!((5..=7).contains(&runtime.version().major()), "{:?}", runtime.version());
    match runtime.device_count() {
        Ok(count) => {
            assert!(count > 0);
            let name = runtime.device_name(0).unwrap();
            assert!(!name.is_empty());
            assert!(matches!(
                runtime.device_name(count),
                Err(RocmError::DeviceOutOfRange { ordinal, count: c }) if ordinal == count && c == count
            ));
        }
        Err(RocmError::NoDevice(error)) => {
            // Without a GPU, hipInit answers "invalid device" and hipGetDeviceCount "no device".
            assert!(
                [HIP_ERROR_NO_DEVICE, HIP_ERROR_INVALID_DEVICE].contains(&error.code),
                "{error}"
            );
            assert!(error.name.starts_with("hipError"), "{error}");
            assert!(matches!(runtime.device_name(0), Err(RocmError::NoDevice(_))));
            // Opening a device checks the kernels first, then the runtime, then the device.
            let opened = RocmDevice::open(0);
            if built_with_kernels() {
                assert!(matches!(opened, Err(RocmError::NoDevice(_))), "{opened:?}");
            } else {
                assert!(matches!(opened, Err(RocmError::BuiltWithoutKernels)), "{opened:?}");
            }
        }
        Err(other) => panic!("expected a device count or NoDevice, got {other}"),
    }
}
