import ArgumentParser
import Foundation
import Logging
import ThinFS

/// `thinfs`: manage ThinFS layer stores, pools and thin devices.
public struct ThinFSCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "thinfs",
        abstract: "Container layers in dm-thin snapshots, served through FUSE.",
        version: ThinFSVersion.string,
        subcommands: [InitCommand.self, ServeCommand.self, LayerCommand.self, ImageCommand.self, MountCommand.self, UmountCommand.self,
                      InfoCommand.self, CleanupCommand.self, PoolCommand.self, DevCommand.self, BenchCommand.self, CompareCommand.self, SetupLVMCommand.self, KernelPoolCommand.self, ImportDockerCommand.self, ClusterCommand.self]
    )

    public init() {}
}

/// Options every command takes.
struct RootOptions: ParsableArguments {
    @Option(name: .long, help: "The ThinFS root directory (default: $THINFS_ROOT or /var/lib/thinfs).")
    var root: String = PoolRoot.defaultPath

    @Flag(name: .shortAndLong, help: "Log at debug level to stderr.")
    var verbose = false

    var poolRoot: PoolRoot {
        Logging.bootstrapOnce(verbose: verbose)
        return PoolRoot(path: root)
    }
}

public enum ThinFSVersion {
    public static let string = "0.1.0"
}

enum Logging {
    nonisolated(unsafe) private static var done = false

    /// Sends swift-log output to stderr; warnings only unless --verbose or THINFS_LOG=debug|info.
    static func bootstrapOnce(verbose: Bool) {
        let env = ProcessInfo.processInfo.environment["THINFS_LOG"].flatMap { Logger.Level(rawValue: $0) }
        bootstrapOnce(level: verbose ? .debug : (env ?? .warning))
    }

    /// Sends swift-log output at `level` and above to stderr (`thinfs serve --log-level`).
    static func bootstrapOnce(level: Logger.Level) {
        guard !done else { return }
        done = true
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }
}

/// A size argument with K/M/G/T suffixes.
struct Size: ExpressibleByArgument, Sendable {
    let bytes: UInt64
    init(bytes: UInt64) { self.bytes = bytes }
    init?(argument: String) {
        guard let b = try? ByteSize.parse(argument) else { return nil }
        bytes = b
    }
    static var defaultCompletionKind: CompletionKind { .default }
}

/// A device id argument, checked against dm-thin's 24 bits.
struct DeviceIDArgument: ExpressibleByArgument, Sendable {
    let id: UInt32
    init?(argument: String) {
        guard let v = UInt64(argument), v <= (1 << 24) - 1 else { return nil }
        id = UInt32(v)
    }
}
