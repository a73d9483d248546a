// swift-tools-version:6.1
//
// ThinFS's fuzz harnesses (libFuzzer): a package of its own, so that the main package's
// `swift build --build-tests` never sees them. Build and run with scripts/fuzz.sh; see README.md.
//
// `ThinFS` is a symlink to `..`: SwiftPM names a path dependency after its directory, and the
// checkout's directory name varies (and may clash with this package's own, "fuzz").
import PackageDescription

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
            ]
        ),
    ] + harnesses.map {
        .executableTarget(
            name: "fuzz-\($0)",
            dependencies: ["FuzzSupport"],
            // The toolchain's lld: gold (the default) stops with an internal error
            // (dwarf_reader.cc format_file_lineno) on these AddressSanitizer objects.
            linkerSettings: [.unsafeFlags(["-use-ld=lld"])]
        )
    },
    swiftLanguageModes: [.v6]
)
