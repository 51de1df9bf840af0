fn main() {
    println!("train: not ready");
}
