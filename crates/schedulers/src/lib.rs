pub mod scheduler {}
