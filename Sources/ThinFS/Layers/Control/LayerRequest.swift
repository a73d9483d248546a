import Foundation

/// One layer-store operation, as the CLI asks for it. The same request runs in the CLI's own
/// process when the pool is free, or in the pool owner (a `thinfs-mount` daemon) through
/// `ROOT/control.sock` when it is not: the store has exactly one writer, so requests go to it.
public struct LayerRequest: Codable, Equatable, Sendable {
    public enum Operation: String, Codable, Sendable {
        case create, createRW = "create-rw", remove = "rm", list = "ls", info, cleanup
        case applyDiff = "apply-diff", diff, mount, importImage = "image-import"
        case kernelMount = "kernel-mount", kernelUnmount = "kernel-umount"
    }

    public var operation: Operation
    public var layer: String?
    public var parent: String?
    public var size: UInt64?
    /// apply-diff: the tar to read; diff: where to write the tar; image import: the image.
    public var path: String?
    public var mountpoint: String?
    public var readOnly: Bool?
    public var mountOptions: [String]?
    public var json: Bool?
    public var name: String?

    public init(_ operation: Operation, layer: String? = nil, parent: String? = nil, size: UInt64? = nil,
                path: String? = nil, mountpoint: String? = nil, readOnly: Bool? = nil, mountOptions: [String]? = nil,
                json: Bool? = nil, name: String? = nil) {
        self.operation = operation
        self.layer = layer
        self.parent = parent
        self.size = size
        self.path = path
        self.mountpoint = mountpoint
        self.readOnly = readOnly
        self.mountOptions = mountOptions
        self.json = json
        self.name = name
    }
}

/// What a request produced: text for stdout, or an error message and its errno.
public struct LayerResponse: Codable, Equatable, Sendable {
    public var output: String
    public var error: String?
    public var errno: Int32?

    public init(output: String = "", error: String? = nil, errno: Int32? = nil) {
        self.output = output
        self.error = error
        self.errno = errno
    }

    public var succeeded: Bool { error == nil }
}
