import ArgumentParser
import ThinFS

/// `thinfs-mount`: the FUSE daemon. Serving files through FUSE and libext2fs
/// arrives with the FUSE-server issue; until then it refuses clearly.
public struct ThinFSMountCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "thinfs-mount",
        abstract: "Serve the ext4 on a thin device through FUSE (not built yet)."
    )

    @Option(help: "The ThinFS root directory.") var root: String = PoolRoot.defaultPath
    @Option(help: "Thin device id.") var device: UInt32?
    @Argument var mountpoint: String?

    public init() {}

    public func run() throws {
        throw ValidationError("thinfs-mount cannot serve files yet: the FUSE server is not part of this build")
    }
}
