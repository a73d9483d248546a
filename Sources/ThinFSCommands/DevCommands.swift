import ArgumentParser
import Foundation
import PersistentData
import ThinFS

struct DevCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dev",
        abstract: "Read and write thin devices.",
        subcommands: [Format.self, Write.self, Read.self, Status.self]
    )

    static let chunk = 1 << 20

    struct Format: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "format", abstract: "Put a fresh ext4 on a thin device with mke2fs and Docker's options.")
        @OptionGroup var options: RootOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        @Option(help: "Filesystem size (default 10G, Docker's dm.basesize).") var size = Size(bytes: 10 << 30)
        @Option(name: .customLong("fs"), help: "Filesystem type: ext4.") var filesystem = "ext4"
        @Option(name: .customLong("mkfs-arg"), help: "An extra mke2fs argument (repeatable).") var mkfsArgs: [String] = []
        @Flag(help: "Format even if the device already holds data.") var force = false

        func run() throws {
            guard let fs = DeviceFormatter.Filesystem(rawValue: filesystem) else {
                throw ThinPoolError.invalidConfiguration("filesystem '\(filesystem)' is not supported: only ext4 (xfs may come later)")
            }
            let root = options.poolRoot
            let pool = try root.open()
            let result = try DeviceFormatter().format(pool: pool, id: id.id, size: size.bytes, filesystem: fs,
                                                      extraArguments: mkfsArgs, force: force, scratchDirectory: root.path + "/tmp")
            try root.record(filesystem: .init(type: fs.rawValue, uuid: result.uuid, size: result.size), for: id.id)
            print("formatted thin device \(id.id): \(fs.rawValue), \(ByteSize.format(result.size)), UUID \(result.uuid), \(result.bytesWritten) bytes written")
        }
    }

    struct Write: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "write", abstract: "Write stdin to a thin device, then commit.")
        @OptionGroup var options: RootOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        @Option(help: "Byte offset to write at (K/M/G/T suffixes allowed).") var offset = Size(bytes: 0)

        func run() throws {
            let pool = try options.poolRoot.open()
            let dev = try pool.openDevice(id.id, size: ThinDevice.maximumSize)
            var position = offset.bytes
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: DevCommand.chunk, alignment: 4096)
            defer { buffer.deallocate() }
            while true {
                var filled = 0
                while filled < buffer.count {
                    let n = Foundation.read(0, buffer.baseAddress! + filled, buffer.count - filled)
                    if n < 0 && errno == EINTR { continue }
                    if n < 0 { throw ThinPoolError.io(operation: "read", path: "stdin", errno: .init(rawValue: errno)) }
                    if n == 0 { break }
                    filled += n
                }
                if filled == 0 { break }
                try dev.write(UnsafeRawBufferPointer(rebasing: buffer[0..<filled]), at: position)
                position += UInt64(filled)
                if filled < buffer.count { break }
            }
            try dev.flush()
        }
    }

    struct Read: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "read", abstract: "Write a thin device's bytes to stdout; unmapped ranges read as zeros.")
        @OptionGroup var options: RootOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument
        @Option(help: "Byte offset to read from (K/M/G/T suffixes allowed).") var offset = Size(bytes: 0)
        @Option(help: "Bytes to read (default: up to the end of the highest mapped block).") var length: Size?

        func run() throws {
            let pool = try options.poolRoot.open(readOnly: true)
            let dev = try pool.openDevice(id.id, size: ThinDevice.maximumSize)
            let total: UInt64
            let offset = self.offset.bytes
            if let length {
                total = length.bytes
            } else {
                let status = try pool.deviceStatus(id.id)
                let end = status.highestMappedSector.map { ($0 + 1) * 512 } ?? 0
                total = end > offset ? end - offset : 0
            }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: DevCommand.chunk, alignment: 4096)
            defer { buffer.deallocate() }
            var done: UInt64 = 0
            while done < total {
                let n = Int(min(UInt64(buffer.count), total - done))
                let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                try dev.read(into: part, at: offset + done)
                var written = 0
                while written < n {
                    let w = Foundation.write(1, part.baseAddress! + written, n - written)
                    if w < 0 && errno == EINTR { continue }
                    if w < 0 { throw ThinPoolError.io(operation: "write", path: "stdout", errno: .init(rawValue: errno)) }
                    written += w
                }
                done += UInt64(n)
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "status", abstract: "Print '<nr mapped sectors> <highest mapped sector>', as the thin target does.")
        @OptionGroup var options: RootOptions
        @Argument(help: "Thin device id.") var id: DeviceIDArgument

        func run() throws {
            print(try options.poolRoot.open(readOnly: true).deviceStatus(id.id).line)
        }
    }
}
