// swift-tools-version:6.1
//
// ThinFS's fuzz harnesses (libFuzzer): a package of its own, so that the main package's
// `swift build --build-tests` never sees them. Build and run with scripts/fuzz.sh; see README.md.
//
// `ThinFS` is a symlink to `..`: SwiftPM names a path dependency after its directory, and the
// checkout's directory name varies (and may clash with this package's own, "fuzz").
import PackageDescription

// scripts/fuzz.sh sets THINFS_FUZZ_SANITIZE (e.g. "fuzzer,address"). Only our own code is
// instrumented: FuzzSupport and the harnesses here, and the main package's modules through the same
// variable (its Package.swift); the dependencies (gRPC, SwiftNIO, swift-protobuf, swift-crypto,
// swift-log) build plainly. The executables link the sanitizers' runtimes (libFuzzer's among them).
let sanitize = Context.environment["THINFS_FUZZ_SANITIZE"].flatMap { $0.isEmpty ? nil : ["-sanitize=\($0)"] } ?? []

let harnesses = ["superblock", "btree", "space-map", "pool", "layer-tar", "image", "docker-dm", "control", "containerd", "docker-plugin"]

let package = Package(
    name: "ThinFSFuzz",
    dependencies: [
        .package(path: "ThinFS"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // The containerd harness builds the generated messages and calls the service directly.
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
    ],
    targets: [
        .target(
            name: "FuzzSupport",
            dependencies: [
                .product(name: "PersistentData", package: "ThinFS"),
                .product(name: "ThinFS", package: "ThinFS"),
                .product(name: "ThinFSContainerd", package: "ThinFS"),
                .product(name: "ThinFSDocker", package: "ThinFS"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: [.unsafeFlags(sanitize)]
        ),
    ] + harnesses.map {
        .executableTarget(
            name: "fuzz-\($0)",
            dependencies: ["FuzzSupport"],
            swiftSettings: [.unsafeFlags(sanitize + ["-parse-as-library"])],
            // The toolchain's lld: gold (the default) stops with an internal error
            // (dwarf_reader.cc format_file_lineno) on these AddressSanitizer objects.
            linkerSettings: [.unsafeFlags(["-use-ld=lld"] + sanitize)]
        )
    },
    swiftLanguageModes: [.v6]
)
