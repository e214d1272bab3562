//! The CUDA backend's kernels compile with NVRTC, for the architectures of
//! the GPUs we serve on, on any machine with libnvrtc (scripts/test.sh puts
//! the one of PyPI's `nvidia-cuda-nvrtc-cu12` on LD_LIBRARY_PATH): no GPU,
//! driver or toolkit needed. Running them needs a GPU: the conformance
//! tests (tests/backends.rs, tests/models.rs) do that where one exists.
#![cfg(feature = "cuda")]

use gpuwasm_tensor::backend::cuda;

#[test]
fn kernels_compile_for_ampere_and_hopper() {
    let required = std::env::var("GPUWASM_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    for arch in ["compute_80", "compute_90"] {
        let ptx = match cuda::compile(arch) {
            Ok(ptx) => ptx.to_src(),
            Err(e) if !required && e.to_string().contains("not installed") => {
                eprintln!("cuda_kernels: NOT CHECKED: {e} (scripts/test.sh installs it and sets GPUWASM_REQUIRE_NVRTC=1)");
                return;
            }
            Err(e) => panic!("{arch}: {e}"),
        };
        for kernel in cuda::KERNEL_NAMES {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{arch}: no entry point {kernel} in the PTX");
        }
        assert!(ptx.contains(&format!(".target sm_{}", &arch[8..])), "{arch}: PTX for another target");
        eprintln!("cuda_kernels: {arch}: {} kernels, {} bytes of PTX", cuda::KERNEL_NAMES.len(), ptx.len());
    }
}

#[test]
fn an_unknown_architecture_is_a_clear_error() {
    // The error users see when NVRTC refuses to compile.
    let Err(e) = cuda::compile("compute_1") else { panic!("compute_1 is no architecture") };
    assert!(e.to_string().contains("NVRTC") || e.to_string().contains("not installed"), "{e}");
}
