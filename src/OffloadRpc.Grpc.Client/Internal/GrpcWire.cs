using global::Grpc.Core;
using MessagePack;
using OffloadRpc.Internal;

namespace OffloadRpc.Grpc.Internal;

/// <summary>Names both sides of the gRPC transport agree on, and the statuses (with their trailers) a server ends a call with.</summary>
internal static class GrpcWire
{
    /// <summary>The request's metadata block (headers, deadline, trace context), as the shared-memory transport encodes it.</summary>
    public const string MetadataHeader = "offloadrpc-metadata-bin";

    public const string FaultTypeTrailer = "offloadrpc-fault-type";

    /// <summary>The stack trace as UTF-8 in a binary trailer: its lines and any character kept, as the shared-memory fault carries it.</summary>
    public const string FaultStackTrailer = "offloadrpc-fault-stack-bin";

    public const string ViolationTrailer = "offloadrpc-violation";

    /// <summary>The most characters of a trailer value (an exception's message, type or stack) or a status detail.</summary>
    private const int MaxTrailerChars = 4096;

    /// <summary>The well-known method every server of this transport serves: who it is and what it serves.</summary>
    public static readonly Method<Frame, Frame> Describe = new(MethodType.Unary, "offloadrpc.Server", "Describe", Frame.Marshaller, Frame.Marshaller);

    /// <summary><see cref="Describe"/> as the server binds it: a request that is not a frame is a protocol violation (<see cref="Frame.OneRequestMarshaller"/>).</summary>
    public static readonly Method<Frame, Frame> DescribeServed = new(MethodType.Unary, Describe.ServiceName, Describe.Name, Frame.OneRequestMarshaller, Frame.Marshaller);

    /// <summary>
    /// How a contract method is bound, from its shape: a request with buffers or a streamed argument may
    /// be several frames (a request stream), a reply with a buffer or a streamed result several frames
    /// (a response stream), and credit for a streamed argument comes back on the response stream. A method
    /// that carries none of them is unary: one frame each way. A method of unknown shape (generated
    /// before methods had one) is duplex, which takes every message. On the wire every type is the same
    /// HTTP/2 stream of length-prefixed messages, so a client calls a streaming method with the unary API
    /// when the request is one frame and the reply is known to be (see <see cref="GrpcMethod"/>).
    /// </summary>
    public static MethodType BindingOf(MethodDescriptor method)
    {
        MethodShape shape = method.Shape;
        if ((shape & MethodShape.Described) == 0)
        {
            return MethodType.DuplexStreaming;
        }

        bool requestStream = (shape & (MethodShape.BufferArguments | MethodShape.StreamedArgument)) != 0;
        bool responseStream = (shape & (MethodShape.BufferResult | MethodShape.StreamedResult | MethodShape.StreamedArgument)) != 0;
        return (requestStream, responseStream) switch
        {
            (false, false) => MethodType.Unary,
            (true, false) => MethodType.ClientStreaming,
            (false, true) => MethodType.ServerStreaming,
            _ => MethodType.DuplexStreaming,
        };
    }

    /// <summary>The gRPC method of a contract method, of the type it is bound as.</summary>
    public static Method<Frame, Frame> Method(MethodDescriptor method) =>
        new(BindingOf(method), method.ServiceName, method.Name, Frame.Marshaller, Frame.Marshaller);

    /// <summary>
    /// The gRPC method a server binds a contract method as: a method of one request message gets it from
    /// gRPC already deserialized, so a frame that does not deserialize is refused there as the protocol
    /// violation it is (<see cref="Frame.OneRequestMarshaller"/>); a request stream's frames are read, and
    /// refused, by the route itself.
    /// </summary>
    public static Method<Frame, Frame> ServerMethod(MethodDescriptor method)
    {
        MethodType type = BindingOf(method);
        Marshaller<Frame> requests = type is MethodType.Unary or MethodType.ServerStreaming ? Frame.OneRequestMarshaller : Frame.Marshaller;
        return new(type, method.ServiceName, method.Name, requests, Frame.Marshaller);
    }

    /// <summary>A request that breaks the protocol, as the status it ends the call with (Internal, the violation in a trailer).</summary>
    public static RpcException Violation(ProtocolViolationException violation) =>
        new(new Status(StatusCode.Internal, violation.Message), new Metadata { { ViolationTrailer, Ascii(violation.Message) } });

    /// <summary>The implementation's exception as status Unknown, its type and stack in trailers (as the shared-memory fault carries them).</summary>
    public static RpcException Fault(Exception ex)
    {
        var trailers = new Metadata
        {
            { FaultTypeTrailer, Ascii(ex.GetType().FullName ?? ex.GetType().Name) },
        };
        if (ex.StackTrace is { Length: > 0 } stack)
        {
            trailers.Add(FaultStackTrailer, Utf8Prefix(stack, MaxStackBytes));
        }

        return new RpcException(new Status(StatusCode.Unknown, ex.Message.Length > MaxTrailerChars ? ex.Message[..MaxTrailerChars] : ex.Message), trailers);
    }

    /// <summary>
    /// The most UTF-8 bytes of a stack trace sent (about 11 KB as base64): with the message and the type,
    /// the trailers stay within the client's limit on response headers (64 KB by default).
    /// </summary>
    private const int MaxStackBytes = 8192;

    /// <summary>The UTF-8 bytes of <paramref name="text"/>, cut at a character boundary to at most <paramref name="maxBytes"/>.</summary>
    private static byte[] Utf8Prefix(string text, int maxBytes)
    {
        byte[] bytes = new byte[Math.Min(maxBytes, System.Text.Encoding.UTF8.GetMaxByteCount(text.Length))];
        System.Text.Unicode.Utf8.FromUtf16(text, bytes, out _, out int written, replaceInvalidSequences: true, isFinalBlock: false);
        return bytes[..written];
    }

    /// <summary>Trailer values are printable ASCII: others become '?', long ones are cut.</summary>
    private static string Ascii(string value)
    {
        var text = new System.Text.StringBuilder(Math.Min(value.Length, MaxTrailerChars));
        foreach (char c in value.AsSpan(0, Math.Min(value.Length, MaxTrailerChars)))
        {
            text.Append(c is >= ' ' and <= '~' ? c : c is '\n' ? '|' : '?');
        }

        return text.ToString();
    }
}

/// <summary>
/// A contract method as the client calls it: the gRPC method it is bound as, and whether its reply is
/// always one frame (unary or client-streaming binding), so that a request of one frame goes as a unary
/// call (the least gRPC does per call), whatever the binding.
/// </summary>
internal sealed class GrpcMethod
{
    public GrpcMethod(MethodDescriptor method)
    {
        Bound = GrpcWire.Method(method);
        OneFrameReply = Bound.Type is MethodType.Unary or MethodType.ClientStreaming;
        Unary = Bound.Type == MethodType.Unary ? Bound : new Method<Frame, Frame>(MethodType.Unary, method.ServiceName, method.Name, Frame.Marshaller, Frame.Marshaller);
        ServerStreaming = Bound.Type == MethodType.ServerStreaming ? Bound : new Method<Frame, Frame>(MethodType.ServerStreaming, method.ServiceName, method.Name, Frame.Marshaller, Frame.Marshaller);
    }

    public Method<Frame, Frame> Bound { get; }

    /// <summary>The same path as a unary method, for a one-frame request of a method whose reply is one frame.</summary>
    public Method<Frame, Frame> Unary { get; }

    /// <summary>The same path as a server-streaming method, for a one-frame request whose reply may be several frames.</summary>
    public Method<Frame, Frame> ServerStreaming { get; }

    public bool OneFrameReply { get; }
}

/// <summary>
/// The answer of <see cref="GrpcWire.Describe"/>: the server's host (boot id), user and process, the
/// shared-memory socket it also listens on (null: none), and the contracts it serves. MessagePack array
/// [bootId, uid, pid, socketPath, {name: hash}].
/// </summary>
internal sealed class ServerDescription
{
    public string BootId { get; init; } = string.Empty;

    public uint UserId { get; init; }

    public int ProcessId { get; init; }

    public string? SocketPath { get; init; }

    public Dictionary<string, ulong> Contracts { get; init; } = [];

    /// <summary>This host's boot id (the same for every process until the next boot), or empty when unknown.</summary>
    public static string ThisBootId { get; } = ReadBootId();

    public byte[] Encode()
    {
        var buffer = new System.Buffers.ArrayBufferWriter<byte>(256);
        var writer = new MessagePackWriter(buffer);
        writer.WriteArrayHeader(5);
        writer.Write(BootId);
        writer.Write(UserId);
        writer.Write(ProcessId);
        writer.Write(SocketPath);
        writer.WriteMapHeader(Contracts.Count);
        foreach (KeyValuePair<string, ulong> contract in Contracts)
        {
            writer.Write(contract.Key);
            writer.Write(contract.Value);
        }

        writer.Flush();
        return buffer.WrittenSpan.ToArray();
    }

    /// <exception cref="ProtocolViolationException">The answer does not decode.</exception>
    public static ServerDescription Decode(ReadOnlyMemory<byte> bytes)
    {
        try
        {
            var reader = new MessagePackReader(bytes);
            if (reader.ReadArrayHeader() != 5)
            {
                throw new ProtocolViolationException("A server description of another shape.");
            }

            string bootId = reader.ReadString() ?? string.Empty;
            uint uid = reader.ReadUInt32();
            int pid = reader.ReadInt32();
            string? socket = reader.ReadString();
            int count = reader.ReadMapHeader();
            var contracts = new Dictionary<string, ulong>(Math.Min(count, 1024));
            for (int i = 0; i < count; i++)
            {
                contracts[reader.ReadString() ?? string.Empty] = reader.ReadUInt64();
            }

            return new ServerDescription { BootId = bootId, UserId = uid, ProcessId = pid, SocketPath = socket, Contracts = contracts };
        }
        catch (MessagePackSerializationException ex)
        {
            throw new ProtocolViolationException("The server description does not decode: " + ex.Message, ex);
        }
        catch (EndOfStreamException ex)
        {
            throw new ProtocolViolationException("The server description is truncated.", ex);
        }
        catch (Exception ex) when (ex is OverflowException or ArgumentOutOfRangeException)
        {
            // A number out of its field's range (a negative user id, say), or a string length of 2 GiB or
            // more, which MessagePack's reader meets as a slice out of range (found by the fuzzer, target grpc).
            throw new ProtocolViolationException("The server description does not decode: " + ex.Message, ex);
        }
    }

    private static string ReadBootId()
    {
        try
        {
            return File.ReadAllText("/proc/sys/kernel/random/boot_id").Trim();
        }
        catch (IOException)
        {
            return string.Empty;
        }
        catch (UnauthorizedAccessException)
        {
            return string.Empty;
        }
    }
}
