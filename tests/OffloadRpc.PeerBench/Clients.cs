using System.Diagnostics;
using System.Net.Http;
using System.Net.Sockets;
using Google.Protobuf;
using Grpc.Net.Client;
using OffloadRpc.Cli;
using OffloadRpc.Grpc;
using OffloadRpc.PeerBench.Grpc;
using StreamJsonRpc;

namespace OffloadRpc.PeerBench;

/// <summary>The benchmark's operations.</summary>
internal enum Op
{
    Add,
    Checksum,
    Touch,
}

/// <summary>
/// One system's client side. Every operation's payload is the first <c>length</c> bytes of
/// <see cref="Source"/> (random bytes, filled once); results come back as a u64 for checking.
/// </summary>
internal abstract class PeerClient : IAsyncDisposable
{
    protected PeerClient(string system, byte[] source)
    {
        System = system;
        Source = source;
    }

    public string System { get; }

    public byte[] Source { get; }

    /// <summary>Wall-clock ticks and CPU nanoseconds the client spent on the application's own work inside calls so far (the zero-copy producer's write into shared memory), taken out of the measurement.</summary>
    public long ExcludedTicks { get; protected set; }

    public long ExcludedCpuNanoseconds { get; protected set; }

    public abstract ValueTask<ulong> InvokeAsync(Op op, int length);

    /// <summary>The transfer mode the row names, if any.</summary>
    public virtual string? Mode(Op op, int length) => null;

    public abstract ValueTask DisposeAsync();
}

/// <summary><c>grpc-uds</c>: gRPC over a Unix socket, HTTP/2 windows enlarged, message limits lifted, the payload wrapped without a copy.</summary>
internal sealed class GrpcPeerClient : PeerClient
{
    private readonly GrpcChannel _channel;
    private readonly PeerBench.Grpc.PeerBench.PeerBenchClient _client;

    public GrpcPeerClient(string socketPath, byte[] source)
        : this("grpc-uds", UnixSocketHandler(socketPath), source)
    {
    }

    /// <summary>Over <paramref name="handler"/> (the in-process comparison's TestServer), otherwise as over a Unix socket.</summary>
    public GrpcPeerClient(string system, HttpMessageHandler handler, byte[] source)
        : base(system, source)
    {
        _channel = GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions
        {
            HttpHandler = handler,
            MaxReceiveMessageSize = null,
            MaxSendMessageSize = null,
        });
        _client = new PeerBench.Grpc.PeerBench.PeerBenchClient(_channel);
    }

    private static SocketsHttpHandler UnixSocketHandler(string socketPath) =>
        new SocketsHttpHandler
        {
            ConnectCallback = async (_, cancellationToken) =>
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), cancellationToken);
                    return new NetworkStream(socket, ownsSocket: true);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            },
            InitialHttp2StreamWindowSize = Servers.ClientWindowBytes,
            EnableMultipleHttp2Connections = true,
        };

    public override async ValueTask<ulong> InvokeAsync(Op op, int length)
    {
        switch (op)
        {
            case Op.Add:
                return (ulong)(await _client.AddAsync(new AddRequest { A = length, B = 1 })).Sum;
            case Op.Checksum:
                return (await _client.ChecksumAsync(new PayloadRequest { Data = UnsafeByteOperations.UnsafeWrap(Source.AsMemory(0, length)) })).Checksum;
            default:
                return (ulong)(await _client.TouchAsync(new PayloadRequest { Data = UnsafeByteOperations.UnsafeWrap(Source.AsMemory(0, length)) })).Length;
        }
    }

    public override ValueTask DisposeAsync()
    {
        _channel.Dispose();
        return ValueTask.CompletedTask;
    }
}

/// <summary>
/// <c>offloadrpc-grpc</c>: this library's proxies over its gRPC transport, on a Unix socket with the same
/// HTTP/2 windows as grpc-uds; buffers cross as 1 MiB frames of a streaming call, small calls as one frame.
/// </summary>
internal sealed class OffloadGrpcPeerClient(OffloadRpcConnection connection, byte[] source) : OffloadPeerClient("offloadrpc-grpc", connection, source)
{
    public static Task<OffloadRpcConnection> ConnectAsync(string socketPath)
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel =>
        {
            channel.HttpHandler = new SocketsHttpHandler
            {
                ConnectCallback = async (_, cancellationToken) =>
                {
                    var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                    try
                    {
                        await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), cancellationToken);
                        return new NetworkStream(socket, ownsSocket: true);
                    }
                    catch
                    {
                        socket.Dispose();
                        throw;
                    }
                },
                InitialHttp2StreamWindowSize = Servers.ClientWindowBytes,
                EnableMultipleHttp2Connections = true,
            };
        });
        return OffloadRpcConnection.ConnectAsync("http://localhost", options);
    }

    /// <summary>Over <paramref name="handler"/>: the in-process comparison's TestServer.</summary>
    public static Task<OffloadRpcConnection> ConnectAsync(HttpMessageHandler handler)
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        options.ConfigureGrpcChannel(channel => channel.HttpHandler = handler);
        return OffloadRpcConnection.ConnectAsync("http://localhost", options);
    }

    public override async ValueTask<ulong> InvokeAsync(Op op, int length) => op switch
    {
        Op.Add => (ulong)await Service.AddAsync(length, 1),
        Op.Checksum => await Service.ChecksumAsync(Source.AsMemory(0, length)),
        _ => (ulong)await Service.TouchAsync(Source.AsMemory(0, length)),
    };

    public override string? Mode(Op op, int length) => op == Op.Add ? null : length <= 64 << 10 ? "grpc: one frame" : "grpc: 1 MiB frames";

    public override ValueTask DisposeAsync() => Connection.DisposeAsync();
}

/// <summary><c>streamjsonrpc-uds</c>: StreamJsonRpc with its MessagePack formatter and length-prefixed framing over a Unix socket.</summary>
internal sealed class StreamJsonRpcPeerClient : PeerClient
{
    private static readonly Type[] AddTypes = [typeof(int), typeof(int)];
    private static readonly Type[] PayloadTypes = [typeof(ReadOnlyMemory<byte>)]; // MessagePack writes it as bin, as it would a byte[], without copying it into an array first

    private readonly JsonRpc _rpc;

    private StreamJsonRpcPeerClient(JsonRpc rpc, byte[] source)
        : base("streamjsonrpc-uds", source) => _rpc = rpc;

    public static async Task<StreamJsonRpcPeerClient> ConnectAsync(string socketPath, byte[] source)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath));
        var stream = new NetworkStream(socket, ownsSocket: true);
        var rpc = new JsonRpc(new LengthHeaderMessageHandler(stream, stream, new MessagePackFormatter()));
        rpc.StartListening();
        return new StreamJsonRpcPeerClient(rpc, source);
    }

    public override async ValueTask<ulong> InvokeAsync(Op op, int length) => op switch
    {
        Op.Add => (ulong)await _rpc.InvokeWithCancellationAsync<int>(nameof(IPeerBenchJsonRpc.AddAsync), [length, 1], AddTypes, CancellationToken.None),
        Op.Checksum => await _rpc.InvokeWithCancellationAsync<ulong>(nameof(IPeerBenchJsonRpc.ChecksumAsync), [new ReadOnlyMemory<byte>(Source, 0, length)], PayloadTypes, CancellationToken.None),
        _ => (ulong)await _rpc.InvokeWithCancellationAsync<long>(nameof(IPeerBenchJsonRpc.TouchAsync), [new ReadOnlyMemory<byte>(Source, 0, length)], PayloadTypes, CancellationToken.None),
    };

    public override ValueTask DisposeAsync()
    {
        _rpc.Dispose();
        return ValueTask.CompletedTask;
    }
}

/// <summary>The three OffloadRpc systems share one connection per server process.</summary>
internal abstract class OffloadPeerClient : PeerClient
{
    protected OffloadPeerClient(string system, OffloadRpcConnection connection, byte[] source)
        : base(system, source)
    {
        Connection = connection;
        Service = connection.GetService<IPeerBenchService>();
    }

    protected OffloadRpcConnection Connection { get; }

    protected IPeerBenchService Service { get; }

    public override ValueTask DisposeAsync() => ValueTask.CompletedTask; // the connection belongs to the runner
}

/// <summary><c>offloadrpc-auto</c>: the payload parameter in Auto mode.</summary>
internal sealed class AutoPeerClient(OffloadRpcConnection connection, byte[] source) : OffloadPeerClient("offloadrpc-auto", connection, source)
{
    public override async ValueTask<ulong> InvokeAsync(Op op, int length) => op switch
    {
        Op.Add => (ulong)await Service.AddAsync(length, 1),
        Op.Checksum => await Service.ChecksumAsync(Source.AsMemory(0, length)),
        _ => (ulong)await Service.TouchAsync(Source.AsMemory(0, length)),
    };

    public override string? Mode(Op op, int length)
    {
        if (op == Op.Add)
        {
            return null;
        }

        Engines.TransferPlan plan = Engines.TransferPolicy.Resolve(length, TransferMode.Auto, CachePolicy.Auto);
        return $"auto: {Name(plan.Mode, plan.Cache)}";
    }

    public static string Name(TransferMode mode, CachePolicy cache) => $"{mode.ToString().ToLowerInvariant()}+{cache.ToString().ToLowerInvariant()}";
}

/// <summary><c>offloadrpc-best</c>: the payload parameter in one fixed mode; the runner picks the fastest per size.</summary>
internal sealed class FixedModePeerClient(OffloadRpcConnection connection, byte[] source) : OffloadPeerClient("offloadrpc-best", connection, source)
{
    /// <summary>Every fixed mode a payload parameter can be declared with (Pipelined needs a Stream parameter to overlap anything, so a buffer parameter gains nothing from it).</summary>
    public static readonly (TransferMode Mode, CachePolicy Cache)[] Modes =
    [
        (TransferMode.Copy, CachePolicy.Inject),
        (TransferMode.Copy, CachePolicy.Bypass),
        (TransferMode.Offload, CachePolicy.Inject),
        (TransferMode.Offload, CachePolicy.Bypass),
        (TransferMode.Hybrid, CachePolicy.Inject),
        (TransferMode.Hybrid, CachePolicy.Bypass),
    ];

    public int Selected { get; set; }

    public override async ValueTask<ulong> InvokeAsync(Op op, int length)
    {
        ReadOnlyMemory<byte> data = Source.AsMemory(0, length);
        if (op == Op.Add)
        {
            return (ulong)await Service.AddAsync(length, 1);
        }

        bool checksum = op == Op.Checksum;
        return Selected switch
        {
            0 => checksum ? await Service.ChecksumCopyInjectAsync(data) : (ulong)await Service.TouchCopyInjectAsync(data),
            1 => checksum ? await Service.ChecksumCopyBypassAsync(data) : (ulong)await Service.TouchCopyBypassAsync(data),
            2 => checksum ? await Service.ChecksumOffloadInjectAsync(data) : (ulong)await Service.TouchOffloadInjectAsync(data),
            3 => checksum ? await Service.ChecksumOffloadBypassAsync(data) : (ulong)await Service.TouchOffloadBypassAsync(data),
            4 => checksum ? await Service.ChecksumHybridInjectAsync(data) : (ulong)await Service.TouchHybridInjectAsync(data),
            _ => checksum ? await Service.ChecksumHybridBypassAsync(data) : (ulong)await Service.TouchHybridBypassAsync(data),
        };
    }

    /// <summary>The declared mode, and what it resolves to at this size when that differs (Offload and Hybrid copy inline below 4 KiB).</summary>
    public override string? Mode(Op op, int length)
    {
        if (op == Op.Add)
        {
            return null;
        }

        (TransferMode mode, CachePolicy cache) = Modes[Selected];
        Engines.TransferPlan plan = Engines.TransferPolicy.Resolve(length, mode, cache);
        string declared = AutoPeerClient.Name(mode, cache);
        string runs = AutoPeerClient.Name(plan.Mode, plan.Cache);
        return declared == runs ? declared : $"{declared} (runs as {runs})";
    }
}

/// <summary>
/// <c>offloadrpc-zero-copy</c>: the client rents a <see cref="SharedBuffer"/>, writes the payload into
/// it (the producer's own work, as it would write into any buffer of its own: excluded from the
/// time and the CPU measured) and passes it; the lease moves to the server, which reads in place and
/// gives it back by disposing it. Renting is measured.
/// </summary>
internal sealed class ZeroCopyPeerClient(OffloadRpcConnection connection, byte[] source) : OffloadPeerClient("offloadrpc-zero-copy", connection, source)
{
    public override async ValueTask<ulong> InvokeAsync(Op op, int length)
    {
        if (op == Op.Add)
        {
            return (ulong)await Service.AddAsync(length, 1);
        }

        SharedBuffer lease = Connection.Rent(length);
        try
        {
            // The producer's write; its CPU is read from the thread's clock (two syscalls, inside the
            // excluded time, whose cost stays in the client's CPU figure: conservative).
            long start = Stopwatch.GetTimestamp();
            long cpuStart = ProcessCpu.ThreadNanoseconds;
            Source.AsSpan(0, length).CopyTo(lease.Span);
            ExcludedCpuNanoseconds += ProcessCpu.ThreadNanoseconds - cpuStart;
            ExcludedTicks += Stopwatch.GetTimestamp() - start;
        }
        catch
        {
            lease.Dispose(); // not passed on yet: it is still ours to give back
            throw;
        }

        return op == Op.Checksum ? await Service.ChecksumSharedAsync(lease) : (ulong)await Service.TouchSharedAsync(lease);
    }

    public override string? Mode(Op op, int length) => op == Op.Add ? null : "shared-buffer";
}
