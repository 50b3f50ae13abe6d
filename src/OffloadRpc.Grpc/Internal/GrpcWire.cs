using global::Grpc.Core;
using MessagePack;

namespace OffloadRpc.Grpc.Internal;

/// <summary>Names both sides of the gRPC transport agree on.</summary>
internal static class GrpcWire
{
    /// <summary>The request's metadata block (headers, deadline, trace context), as the shared-memory transport encodes it.</summary>
    public const string MetadataHeader = "offloadrpc-metadata-bin";

    public const string FaultTypeTrailer = "offloadrpc-fault-type";

    public const string FaultStackTrailer = "offloadrpc-fault-stack";

    public const string ViolationTrailer = "offloadrpc-violation";

    /// <summary>The well-known method every server of this transport serves: who it is and what it serves.</summary>
    public static readonly Method<Frame, Frame> Describe = new(MethodType.Unary, "offloadrpc.Server", "Describe", Frame.Marshaller, Frame.Marshaller);

    /// <summary>
    /// Every contract method is bound as a duplex-streaming gRPC method (a request or reply with buffers is
    /// several frames); a client whose request is one frame calls it as a server-streaming call.
    /// </summary>
    public static Method<Frame, Frame> Method(string serviceName, string name) =>
        new(MethodType.DuplexStreaming, serviceName, name, Frame.Marshaller, Frame.Marshaller);
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
