//! `sluice info`: every backend reported, available or with a reason, and the ROCm details taken
//! from what this build really embeds.

use std::process::Command;

use serde_json::Value;

fn info(args: &[&str]) -> String {
    let output =
        Command::new(env!("CARGO_BIN_EXE_sluice")).arg("info").args(args).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn json_names_every_backend_and_why_each_unavailable_one_is() {
    let report: Value = serde_json::from_str(&info(&["--json"])).unwrap();
    let backends = report["backends"].as_array().unwrap();
    let names: Vec<_> = backends.iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu", "cuda", "rocm"]);
    assert_eq!(backends[0]["available"], true, "the CPU backend runs everywhere");
    for backend in backends {
        let available = backend["available"].as_bool().unwrap();
        assert_eq!(backend["why_not"].is_string(), !available, "{backend}");
    }
    let rocm = &backends[2];
    let archs: Vec<_> =
        rocm["architectures"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(archs, sluice_backend_rocm::architectures());
    if sluice_backend_rocm::built_with_kernels() {
        let kernels = rocm["kernels"].as_array().unwrap();
        assert!(kernels.iter().any(|k| k == "sluice_route"), "{rocm}");
        assert_eq!(rocm["compiler"], sluice_backend_rocm::COMPILER);
    } else {
        assert_eq!(
            rocm["why_not"],
            "built without AMD kernels (no clang++ 19 or newer when sluice was compiled)"
        );
    }
    match sluice_backend_rocm::HipRuntime::load() {
        Ok(runtime) => assert_eq!(rocm["hip_runtime"]["version"], runtime.version().to_string()),
        Err(_) => assert!(rocm["hip_runtime"]["error"].is_string(), "{rocm}"),
    }
}

#[test]
fn text_has_one_verdict_line_per_backend() {
    let text = info(&[]);
    let verdicts: Vec<_> = text.lines().filter(|line| !line.starts_with(' ')).collect();
    assert_eq!(verdicts.len(), 3, "{text}");
    assert!(verdicts[0].starts_with("cpu   available"), "{text}");
    assert!(verdicts[2].starts_with("rocm  "), "{text}");
}
