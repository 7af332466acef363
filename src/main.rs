fn main() {
    println!("peaqos-agent {}", env!("CARGO_PKG_VERSION"));
}
