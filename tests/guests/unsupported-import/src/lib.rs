//! A component that imports an interface no gpuwasm host provides: deploys
//! of it must be refused with a message naming the import.

wit_bindgen::generate!({
    inline: "
        package gpuwasm-test:unsupported;
        interface secret-service {
            launch: func() -> u32;
        }
        world needs-secret {
            import secret-service;
            export run: func() -> u32;
        }
    ",
});

struct Component;

impl Guest for Component {
    fn run() -> u32 {
        gpuwasm_test::unsupported::secret_service::launch()
    }
}

export!(Component);
