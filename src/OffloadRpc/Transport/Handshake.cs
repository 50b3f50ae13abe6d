using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>Why a handshake was refused; travels in a <see cref="FrameType.Reject"/> frame.</summary>
internal enum RejectReason : ushort
{
    /// <summary>The client speaks another protocol version.</summary>
    VersionMismatch = 1,

    /// <summary>A service the client expects has another contract hash here.</summary>
    ContractMismatch = 2,

    /// <summary>The ring geometry the client asked for is out of bounds.</summary>
    BadGeometry = 3,

    /// <summary>The client's user id is neither ours nor allowed.</summary>
    Unauthorized = 4,

    /// <summary>The Hello frame did not parse.</summary>
    Malformed = 5,
}

/// <summary>
/// The rendezvous: over a freshly connected Unix socket both sides check each other's uid
/// (SO_PEERCRED), the client sends Hello (protocol version, ring geometry, contract hashes, and its
/// control-area memfd), the server answers Welcome (its control-area memfd) or Reject (why).
/// The whole handshake has one deadline, every field a bound; a mismatch is an exception on both sides.
/// Neither side blocks a thread: reads wait in the process's <see cref="SocketReactor"/>.
/// </summary>
internal static class Handshake
{
    private const int MaxContracts = 256;
    private const int MaxContractName = 512;

    /// <summary>
    /// The client's half: connects, checks the server's uid, sends Hello and reads Welcome, all without
    /// blocking a thread and all within <see cref="TransportOptions.HandshakeTimeout"/> (one deadline for
    /// the whole handshake, not one per read).
    /// </summary>
    public static async Task<RpcConnection> ConnectAsync(string endpoint, TransportOptions options, IReadOnlyList<ContractDescriptor> contracts, IRequestHandler? handler, CancellationToken cancellationToken)
    {
        string path = EndpointPath.Resolve(endpoint);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (options.HandshakeTimeout != Timeout.InfiniteTimeSpan)
        {
            deadline.CancelAfter(options.HandshakeTimeout);
        }

        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        SocketChannel? channel = null;
        ControlArea? outbound = null;
        ControlArea? inbound = null;
        try
        {
            try
            {
                await socket.ConnectAsync(new UnixDomainSocketEndPoint(path), deadline.Token).ConfigureAwait(false);
            }
            catch (SocketException ex) when (ex.SocketErrorCode is SocketError.AddressNotAvailable or SocketError.ConnectionRefused or SocketError.AccessDenied)
            {
                throw new PeerDisconnectedException($"No OffloadRpc server is listening at {path} ({ex.SocketErrorCode}).", ex);
            }

            channel = new SocketChannel(socket);
            PeerInfo peer = CheckPeer(channel, options, "server");

            outbound = ControlArea.Create(options.Geometry, "offloadrpc-client-control");
            channel.Send(FrameType.Hello, EncodeHello(options, contracts), outbound.Segment.Descriptor, options.HandshakeTimeout);

            Dictionary<string, ulong> served;
            using (var welcome = new FrameHolder()) // descriptors not taken are closed here, on every path
            {
                if (!await channel.ReceiveAsync(welcome, deadline.Token).ConfigureAwait(false))
                {
                    throw new PeerDisconnectedException($"The server at {path} closed the connection during the handshake.");
                }

                served = ReadWelcome(welcome, path, options);
                inbound = MapControlArea(welcome.Descriptors.Take(0), options.Geometry, options); // owns the descriptor from here
            }

            outbound.Segment.CloseDescriptor();
            foreach (ContractDescriptor contract in contracts)
            {
                if (served.TryGetValue(contract.Name, out ulong servedHash) && servedHash != contract.Hash)
                {
                    throw new ContractMismatchException(MismatchMessage(contract.Name, contract.Hash, "this client was built against", servedHash, "the server implements")) { ServiceName = contract.Name };
                }
            }

            var connection = new RpcConnection(channel, options, outbound, inbound, peer, handler, "client") { PeerContracts = served };
            outbound = null; // the connection owns both areas and the channel now
            inbound = null;
            channel = null;
            await StartOrReleaseAsync(connection).ConfigureAwait(false);
            return connection;
        }
        catch (Exception ex)
        {
            // Until the connection exists this method owns the socket and both areas; after, the connection does.
            outbound?.Dispose();
            inbound?.Dispose();
            if (channel is not null)
            {
                channel.Dispose();
            }
            else
            {
                socket.Dispose();
            }

            if (cancellationToken.IsCancellationRequested)
            {
                throw new OperationCanceledException("Connecting was cancelled.", ex, cancellationToken);
            }

            if (deadline.IsCancellationRequested && ex is OperationCanceledException or TimeoutException)
            {
                throw new PeerDisconnectedException($"The server at {path} did not complete the handshake within {options.HandshakeTimeout.TotalSeconds:0.#} s.", ex);
            }

            if (ex is TimeoutException)
            {
                throw new PeerDisconnectedException($"The server at {path} did not read the handshake within {options.HandshakeTimeout.TotalSeconds:0.#} s.", ex);
            }

            throw;
        }
    }

    /// <summary>Reads a Welcome (or a Reject) frame: the services the server implements.</summary>
    internal static Dictionary<string, ulong> ReadWelcome(FrameHolder frame, string path, TransportOptions options)
    {
        if (frame.Type == FrameType.Reject)
        {
            throw DecodeReject(frame.Payload, path);
        }

        if (frame.Type != FrameType.Welcome || frame.Descriptors.Count != 1)
        {
            throw new ProtocolViolationException($"The server at {path} answered the handshake with frame {(int)frame.Type} and {frame.Descriptors.Count} descriptors.");
        }

        var served = new Dictionary<string, ulong>(StringComparer.Ordinal);
        var reader = new FrameReader(frame.Payload, "Welcome");
        bool valid = reader.ReadUInt32() == TransportProtocol.HelloMagic && reader.ReadInt32() == options.ProtocolVersion;
        if (!valid)
        {
            throw new ProtocolViolationException($"The server at {path} answered with a Welcome of another protocol.");
        }

        int count = reader.ReadUInt16();
        if (count > MaxContracts)
        {
            throw new ProtocolViolationException($"The server at {path} listed {count} services (limit {MaxContracts}).");
        }

        for (int i = 0; i < count; i++)
        {
            string name = reader.ReadString(MaxContractName);
            served[name] = reader.ReadUInt64();
        }

        return served;
    }

    /// <summary>
    /// The server's half, for each accepted socket: without a thread of its own, and within one
    /// <see cref="TransportOptions.HandshakeTimeout"/> for the whole handshake (a client that trickles
    /// its Hello a byte at a time is dropped on time).
    /// </summary>
    public static async Task<RpcConnection> AcceptAsync(Socket socket, TransportOptions options, IReadOnlyList<ContractDescriptor> served, IRequestHandler handler, CancellationToken cancellationToken)
    {
        var channel = new SocketChannel(socket);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (options.HandshakeTimeout != Timeout.InfiniteTimeSpan)
        {
            deadline.CancelAfter(options.HandshakeTimeout);
        }

        bool ownedByConnection = false;
        try
        {
            PeerInfo peer;
            try
            {
                peer = CheckPeer(channel, options, "client");
            }
            catch (UnauthorizedAccessException ex)
            {
                TrySendReject(channel, RejectReason.Unauthorized, ex.Message, null);
                throw;
            }

            using var hello = new FrameHolder(); // closes the descriptor unless MapControlArea took it
            bool received;
            try
            {
                // The rest of the server's half is short and never blocks: it runs on the reactor's thread, so
                // admitting a hundred clients at once does not grow the thread pool.
                received = await channel.ReceiveAsync(hello, deadline.Token, inline: true).ConfigureAwait(false);
            }
            catch (OperationCanceledException ex) when (!cancellationToken.IsCancellationRequested)
            {
                throw new TimeoutException($"Client process {peer.ProcessId} did not complete its Hello within {options.HandshakeTimeout.TotalSeconds:0.#} s.", ex);
            }

            if (!received)
            {
                throw new PeerDisconnectedException("The client closed the connection before its Hello.");
            }

            RpcConnection connection = Admit(channel, hello, peer, options, served, handler);
            ownedByConnection = true;
            await StartOrReleaseAsync(connection).ConfigureAwait(false);
            return connection;
        }
        catch
        {
            if (!ownedByConnection)
            {
                channel.Dispose();
            }

            throw;
        }
    }

    /// <summary>Checks a Hello, maps the client's control area, answers Welcome and builds the connection (or rejects, and throws why).</summary>
    internal static RpcConnection Admit(SocketChannel channel, FrameHolder hello, PeerInfo peer, TransportOptions options, IReadOnlyList<ContractDescriptor> served, IRequestHandler handler)
    {
        ControlArea? inbound = null;
        ControlArea? outbound = null;
        try
        {
            if (hello.Type != FrameType.Hello || hello.Descriptors.Count != 1)
            {
                TrySendReject(channel, RejectReason.Malformed, "expected Hello with one descriptor", null);
                throw new ProtocolViolationException($"Client process {peer.ProcessId} opened with frame {(int)hello.Type} and {hello.Descriptors.Count} descriptors instead of Hello.");
            }

            var reader = new FrameReader(hello.Payload, "Hello");
            if (reader.ReadUInt32() != TransportProtocol.HelloMagic)
            {
                throw new ProtocolViolationException($"Client process {peer.ProcessId} is not an OffloadRpc client (bad magic).");
            }

            int version = reader.ReadInt32();
            if (version != options.ProtocolVersion)
            {
                string message = $"Protocol version mismatch: the client (process {peer.ProcessId}) speaks version {version}, this server speaks {options.ProtocolVersion}.";
                TrySendReject(channel, RejectReason.VersionMismatch, message, null);
                throw new ContractMismatchException(message);
            }

            var geometry = new RingGeometry(reader.ReadInt32(), reader.ReadInt32(), reader.ReadInt32());
            if (geometry.Validate() is { } problem)
            {
                TrySendReject(channel, RejectReason.BadGeometry, problem, null);
                throw new ProtocolViolationException($"Client process {peer.ProcessId} asked for unusable rings: {problem}.");
            }

            int contractCount = reader.ReadUInt16();
            if (contractCount > MaxContracts)
            {
                throw new ProtocolViolationException($"Client process {peer.ProcessId} sent {contractCount} contracts (limit {MaxContracts}).");
            }

            // The client lists every service compiled into it; those this server also serves must match.
            var clientContracts = new Dictionary<string, ulong>(StringComparer.Ordinal);
            for (int i = 0; i < contractCount; i++)
            {
                string name = reader.ReadString(MaxContractName);
                ulong hash = reader.ReadUInt64();
                clientContracts[name] = hash;
                string? mismatch = Mismatch(served, name, hash, "the client was built against", "the server implements");
                if (mismatch is not null)
                {
                    TrySendReject(channel, RejectReason.ContractMismatch, mismatch, name);
                    throw new ContractMismatchException(mismatch) { ServiceName = name };
                }
            }

            if (ControlArea.RequiredSize(geometry) > options.MaxPeerControlAreaBytes)
            {
                string tooLarge = $"rings of {ControlArea.RequiredSize(geometry)} bytes exceed this server's limit of {options.MaxPeerControlAreaBytes}";
                TrySendReject(channel, RejectReason.BadGeometry, tooLarge, null);
                throw new ProtocolViolationException($"Client process {peer.ProcessId} asked for {tooLarge}.");
            }

            inbound = MapControlArea(hello.Descriptors.Take(0), geometry, options); // owns the descriptor from here, whether it succeeds or not
            outbound = ControlArea.Create(geometry, "offloadrpc-server-control");
            channel.Send(FrameType.Welcome, EncodeContracts(options, served, withGeometry: false), outbound.Segment.Descriptor, options.HandshakeTimeout);
            outbound.Segment.CloseDescriptor();
            var connection = new RpcConnection(channel, options, outbound, inbound, peer, handler, "server") { PeerContracts = clientContracts };
            inbound = null; // owned by the connection now
            outbound = null;
            return connection;
        }
        catch
        {
            inbound?.Dispose();
            outbound?.Dispose();
            throw;
        }
    }

    /// <summary>Starts the connection; if that fails the connection releases everything it owns.</summary>
    private static async ValueTask StartOrReleaseAsync(RpcConnection connection)
    {
        try
        {
            connection.Start();
        }
        catch (Exception ex)
        {
            connection.Terminate(new PeerDisconnectedException("The connection could not start: " + ex.Message, ex));
            await connection.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private static PeerInfo CheckPeer(SocketChannel channel, TransportOptions options, string what)
    {
        (int pid, uint uid, uint gid) = channel.GetPeerCredentials();
        uint self = LinuxNative.GetEuid();
        if (uid != self && !options.AllowedUserIds.Contains(uid))
        {
            throw new UnauthorizedAccessException($"The {what} (process {pid}) runs as uid {uid}; only uid {self}{(options.AllowedUserIds.Count > 0 ? " and " + string.Join(", ", options.AllowedUserIds) : string.Empty)} may connect. Add it to AllowedUserIds to allow it.");
        }

        return new PeerInfo(pid, uid, gid);
    }

    /// <summary>Maps the peer's control area; owns <paramref name="descriptor"/> whether it succeeds or not.</summary>
    private static ControlArea MapControlArea(SafeMemfdHandle descriptor, RingGeometry geometry, TransportOptions options)
    {
        long size = (ControlArea.RequiredSize(geometry) + 4095) & ~4095L;
        SharedMemorySegment segment = SharedMemorySegment.MapPeer(0, descriptor, size, options.MaxPeerSegmentBytes); // closes the descriptor
        try
        {
            unsafe
            {
                if (*(ulong*)segment.Base != ControlArea.Magic)
                {
                    throw new ProtocolViolationException("The peer's control area does not start with the OffloadRpc magic.");
                }
            }

            return new ControlArea(segment, geometry);
        }
        catch
        {
            segment.Dispose();
            throw;
        }
    }

    private static string? Mismatch(IReadOnlyList<ContractDescriptor> served, string name, ulong hash, string clientSide, string serverSide)
    {
        foreach (ContractDescriptor contract in served)
        {
            if (contract.Name == name && contract.Hash != hash)
            {
                return MismatchMessage(name, hash, clientSide, contract.Hash, serverSide);
            }
        }

        return null;
    }

    private static string MismatchMessage(string name, ulong hash, string clientSide, ulong servedHash, string serverSide) =>
        $"Contract mismatch for '{name}': {clientSide} contract {hash:x16}, {serverSide} {servedHash:x16}. Rebuild both sides against the same interface.";

    private static byte[] EncodeHello(TransportOptions options, IReadOnlyList<ContractDescriptor> contracts) => EncodeContracts(options, contracts, withGeometry: true);

    /// <summary>Hello: magic, version, geometry, contracts. Welcome: magic, version, contracts.</summary>
    private static byte[] EncodeContracts(TransportOptions options, IReadOnlyList<ContractDescriptor> contracts, bool withGeometry)
    {
        if (contracts.Count > MaxContracts)
        {
            throw new ArgumentException($"At most {MaxContracts} service contracts per connection.", nameof(contracts));
        }

        using var stream = new MemoryStream();
        using var writer = new BinaryWriter(stream, Encoding.UTF8);
        writer.Write(TransportProtocol.HelloMagic);
        writer.Write(options.ProtocolVersion);
        if (withGeometry)
        {
            writer.Write(options.SlotSize);
            writer.Write(options.SlotCount);
            writer.Write(options.ReleaseSlotCount);
        }

        writer.Write((ushort)contracts.Count);
        foreach (ContractDescriptor contract in contracts)
        {
            byte[] name = Encoding.UTF8.GetBytes(contract.Name);
            if (name.Length > MaxContractName)
            {
                throw new ArgumentException($"Contract name '{contract.Name}' is longer than {MaxContractName} bytes.", nameof(contracts));
            }

            writer.Write((ushort)name.Length);
            writer.Write(name);
            writer.Write(contract.Hash);
        }

        writer.Flush();
        return stream.ToArray();
    }

    private static void TrySendReject(SocketChannel channel, RejectReason reason, string message, string? serviceName)
    {
        try
        {
            byte[] text = Encoding.UTF8.GetBytes(message.Length > 4000 ? message[..4000] : message);
            byte[] service = Encoding.UTF8.GetBytes(serviceName ?? string.Empty);
            byte[] frame = new byte[2 + 2 + text.Length + 2 + service.Length];
            BinaryPrimitives.WriteUInt16LittleEndian(frame, (ushort)reason);
            BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(2), (ushort)text.Length);
            text.CopyTo(frame, 4);
            BinaryPrimitives.WriteUInt16LittleEndian(frame.AsSpan(4 + text.Length), (ushort)service.Length);
            service.CopyTo(frame, 6 + text.Length);
            channel.Send(FrameType.Reject, frame, descriptor: null, TimeSpan.Zero); // never wait for a client we are refusing
        }
        catch (Exception ex) when (ex is OffloadRpcException or TimeoutException or ObjectDisposedException)
        {
        }
    }

    private static Exception DecodeReject(ReadOnlySpan<byte> payload, string path)
    {
        var reader = new FrameReader(payload, "Reject");
        var reason = (RejectReason)reader.ReadUInt16();
        string message = reader.ReadString(8192);
        string service = reader.ReadString(MaxContractName);
        string text = $"The server at {path} refused the connection: {message}";
        return reason switch
        {
            RejectReason.VersionMismatch => new ContractMismatchException(text),
            RejectReason.ContractMismatch => new ContractMismatchException(text) { ServiceName = service.Length == 0 ? null : service },
            RejectReason.Unauthorized => new UnauthorizedAccessException(text),
            _ => new ProtocolViolationException(text),
        };
    }

    /// <summary>Reads little-endian fields from a frame; running off its end is a protocol violation.</summary>
    private ref struct FrameReader
    {
        private readonly ReadOnlySpan<byte> _data;
        private readonly string _frame;
        private int _position;

        public FrameReader(ReadOnlySpan<byte> data, string frame)
        {
            _data = data;
            _frame = frame;
            _position = 0;
        }

        private ReadOnlySpan<byte> Take(int count)
        {
            if (count < 0 || _data.Length - _position < count)
            {
                throw new ProtocolViolationException($"The peer sent a truncated {_frame} frame.");
            }

            ReadOnlySpan<byte> span = _data.Slice(_position, count);
            _position += count;
            return span;
        }

        public ushort ReadUInt16() => BinaryPrimitives.ReadUInt16LittleEndian(Take(2));

        public int ReadInt32() => BinaryPrimitives.ReadInt32LittleEndian(Take(4));

        public uint ReadUInt32() => BinaryPrimitives.ReadUInt32LittleEndian(Take(4));

        public ulong ReadUInt64() => BinaryPrimitives.ReadUInt64LittleEndian(Take(8));

        public string ReadString(int maxBytes)
        {
            int length = ReadUInt16();
            if (length > maxBytes)
            {
                throw new ProtocolViolationException($"The peer sent a {_frame} string of {length} bytes (limit {maxBytes}).");
            }

            return Encoding.UTF8.GetString(Take(length));
        }
    }
}
