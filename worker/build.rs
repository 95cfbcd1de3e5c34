//! Adds an rpath to the libtorch that `tch` linked (the venv's `torch/lib`),
//! so `llmos-worker` starts without `LD_LIBRARY_PATH`.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let lib = match std::env::var("LIBTORCH") {
        Ok(root) => Some(format!("{root}/lib")),
        Err(_) => std::process::Command::new(
            std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or("python3".into()),
        )
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
    };
    match lib {
        Some(dir) => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        None => {
            println!("cargo:warning=torch/lib not found: set LD_LIBRARY_PATH to run llmos-worker")
        }
    }
}
