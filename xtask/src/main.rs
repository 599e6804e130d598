//! Temporary entry point while the CLI is written: `cargo xtask build-guest ARCH...`.
fn main() {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let mut failed = false;
    for name in &args {
        let Some(arch) = hvo_images::Arch::from_name(name) else {
            eprintln!("unknown architecture {name}");
            std::process::exit(2);
        };
        match hvo_images::build_guest(arch) {
            Ok(p) => println!("{}", p.display()),
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    std::process::exit(failed as i32)
}
