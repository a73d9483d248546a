import Foundation

/// One layer-store operation, as the CLI asks for it. The same request runs in the CLI's own
/// process when the pool is free, or in the pool owner (a `thinfs-mount` daemon) through
/// `ROOT/control.sock` when it is not: the store has exactly one writer, so requests go to it.
public struct LayerRequest: Codable, Equatable, Sendable {
    public enum Operation: String, Codable, Sendable {
        case create, createRW = "create-rw", resize, remove = "rm", list = "ls", info, cleanup
        case applyDiff = "apply-diff", diff, mount, importImage = "image-import"
        case kernelMount = "kernel-mount", kernelUnmount = "kernel-umount"
        /// The cluster's layer catalogue (RBD stores with rbd.catalogue); take-over and
        /// cluster-forget: `name` is the other store's rbd.prefix.
        case clusterList = "cluster-ls", takeOver = "take-over", clusterForget = "cluster-forget"
        /// The pool's live status (`PoolStatusReport`, as JSON): `thinfs pool status` of a root
        /// that a daemon holds; `human` picks the long form.
        case poolStatus = "pool-status"
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
    /// pool-status: the long form (`thinfs pool status --human`).
    public var human: Bool?

    public init(_ operation: Operation, layer: String? = nil, parent: String? = nil, size: UInt64? = nil,
                path: String? = nil, mountpoint: String? = nil, readOnly: Bool? = nil, mountOptions: [String]? = nil,
                json: Bool? = nil, name: String? = nil, human: Bool? = nil) {
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
        self.human = human
    }
}

extension LayerRequest {
    /// A request line that is not a request, naming the field at fault.
    public struct DecodingFailure: Swift.Error, CustomStringConvertible, Equatable {
        /// The field, as a path (`size`, `mountOptions[1]`); nil for the line as a whole.
        public var field: String?
        public var problem: String
        public var description: String { field.map { "field '\($0)': \(problem)" } ?? problem }
    }

    /// Decodes one request line (JSON). Valid JSON with a field of the wrong type or out of
    /// range is reported as that, naming the field, not as invalid JSON.
    public static func decode(_ line: Data) throws(DecodingFailure) -> LayerRequest {
        do {
            return try JSONDecoder().decode(LayerRequest.self, from: line)
        } catch let error as DecodingError {
            throw DecodingFailure(error)
        } catch {
            throw DecodingFailure(field: nil, problem: "not a request: \(error)")
        }
    }

    private enum CodingKeys: String, CodingKey {
        case operation, layer, parent, size, path, mountpoint, readOnly, mountOptions, json, name, human
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        operation = try c.decode(Operation.self, forKey: .operation)
        layer = try Self.field(c, .layer)
        parent = try Self.field(c, .parent)
        size = try Self.field(c, .size)
        path = try Self.field(c, .path)
        mountpoint = try Self.field(c, .mountpoint)
        readOnly = try Self.field(c, .readOnly)
        mountOptions = try Self.field(c, .mountOptions)
        json = try Self.field(c, .json)
        name = try Self.field(c, .name)
        human = try Self.field(c, .human)
    }

    /// An optional field. Foundation's JSONDecoder reports a number that does not fit the field's
    /// type (-1 or 1.5 for a UInt64) with no coding path, which reaches the caller as "not valid
    /// JSON": here it becomes an error about this field.
    private static func field<T: Decodable>(_ c: KeyedDecodingContainer<CodingKeys>, _ key: CodingKeys) throws -> T? {
        do {
            return try c.decodeIfPresent(T.self, forKey: key)
        } catch let error as DecodingError {
            throw error
        } catch {
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "the value is not a \(T.self) (out of range, or not a whole number)")
        }
    }
}

extension LayerRequest.DecodingFailure {
    init(_ error: DecodingError) {
        func path(_ keys: [any CodingKey]) -> String? {
            guard !keys.isEmpty else { return nil }
            return keys.reduce("") { text, key in
                if let index = key.intValue { return text + "[\(index)]" }
                return text.isEmpty ? key.stringValue : text + "." + key.stringValue
            }
        }
        switch error {
        case .typeMismatch(_, let context):
            self.init(field: path(context.codingPath),
                      problem: context.codingPath.isEmpty ? "a request is a JSON object: \(context.debugDescription)" : context.debugDescription)
        case .valueNotFound(_, let context):
            self.init(field: path(context.codingPath), problem: "null where a value is needed: \(context.debugDescription)")
        case .keyNotFound(let key, let context):
            self.init(field: path(context.codingPath + [key]), problem: "missing")
        case .dataCorrupted(let context):
            if context.codingPath.isEmpty {
                self.init(field: nil, problem: "not valid JSON\(context.underlyingError.map { " (\($0))" } ?? "")")
            } else {
                self.init(field: path(context.codingPath), problem: context.debugDescription)
            }
        @unknown default:
            self.init(field: nil, problem: "\(error)")
        }
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
