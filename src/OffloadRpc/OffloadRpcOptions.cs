using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc;

/// <summary>Settings of a connection or a server. The defaults suit payloads from bytes to hundreds of MiB.</summary>
public sealed class OffloadRpcOptions
{
    /// <summary>
    /// The longest a waiter spins before it sleeps on a futex (a futex wake costs 20-150 us on a VM; a spin
    /// hand-off ~0.1 us). The poller spins only while a peer calls actively or replies are due within it,
    /// never with more spinning threads than cores, so an idle connection costs nothing. Zero: never spin.
    /// </summary>
    public TimeSpan SpinBudget { get; set; } = TimeSpan.FromMicroseconds(200);

    /// <summary>Ring slots per direction: the most calls one connection has in flight (a power of two).</summary>
    public int MaxConcurrentCalls { get; set; } = 256;

    /// <summary>Size of an ordinary shared-memory segment; larger payloads get a segment of their own.</summary>
    public long SegmentSize { get; set; } = 64L << 20;

    /// <summary>The most shared memory one direction of a connection may hold.</summary>
    public long MaxArenaBytes { get; set; } = 2L << 30;

    /// <summary>
    /// How long a call waits for shared memory to be released before <see cref="ArenaExhaustedException"/>;
    /// also how long a pipelined payload may make no progress before its sender is disconnected with
    /// <see cref="ProtocolViolationException"/>.
    /// </summary>
    public TimeSpan ArenaWaitTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>How long connecting and the handshake may take.</summary>
    public TimeSpan HandshakeTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>User ids besides this process's own that may connect (server) or serve (client).</summary>
    public IList<uint> AllowedUserIds { get; } = new List<uint>();

    /// <summary>
    /// Run await continuations of calls on the thread pool instead of inline on the poller thread that
    /// received the reply (one thread per process watches every connection). Inline is faster; turn
    /// this on if code after an await blocks synchronously, computes for long, or waits on another call.
    /// </summary>
    public bool RunContinuationsAsynchronously { get; set; }

    /// <summary>
    /// Server: run service methods on the thread pool instead of inline on the poller thread (one thread
    /// per process watches every connection's requests). Inline (the default) has the lowest latency,
    /// but a method that computes synchronously holds up every connection of that poller, and their
    /// cancellations, until it returns or awaits. Turn this on for CPU-heavy synchronous methods and for
    /// concurrent calls. Calls whose payload is still arriving (Pipelined) always go to the thread pool.
    /// </summary>
    public bool DispatchToThreadPool { get; set; }

    /// <summary>
    /// Client, given a gRPC address (<c>http://</c>, <c>https://</c>, or one gRPC resolves such as
    /// <c>dns:///host:port</c>, where the server that answers the first call decides): when the server runs on this host (the
    /// same boot id) as this user (or a user in <see cref="AllowedUserIds"/>) and also listens on shared
    /// memory, connect through shared memory instead of gRPC. Default true; false keeps every call on gRPC.
    /// </summary>
    public bool PreferSharedMemory { get; set; } = true;

    /// <summary>
    /// Server served over gRPC as well (<c>MapOffloadRpcGrpc</c>): whether its answer to a connecting client
    /// names its shared-memory endpoint, with the host's boot id, its user id and process id, so that
    /// clients on this host switch to shared memory (<see cref="PreferSharedMemory"/>). Default true; false:
    /// every client stays on gRPC, and a caller that can reach the gRPC port learns nothing of this host
    /// but the contracts served.
    /// </summary>
    public bool AdvertiseSharedMemory { get; set; } = true;

    /// <summary>Settings of other transports (the gRPC channel's), keyed by the assembly that owns them.</summary>
    internal Dictionary<object, object> TransportSettings { get; } = [];

    /// <summary>
    /// The most shared memory (all its segments together) one peer may have this process map: a peer
    /// that hands over more is disconnected with <see cref="ProtocolViolationException"/>. Default 8 GiB.
    /// </summary>
    public long MaxPeerMappedBytes { get; set; } = 8L << 30;

    /// <summary>
    /// Server served over gRPC as well (<c>MapOffloadRpcGrpc</c>): the most bytes the requests in flight may
    /// hold in this server's own memory, all callers together (gRPC delivers a buffer into the receiving
    /// process, where shared memory leaves it in the peer's segments, which <see cref="MaxPeerMappedBytes"/>
    /// bounds). A buffer counts its bytes as they arrive, in steps of 1 MiB (the size a request names counts
    /// nothing of itself), and the size of its memory mapping once all are in, until it is disposed (a
    /// method that keeps a buffer argument keeps it counted); an array argument read into its array (at most 1 MiB)
    /// counts the array from its first byte; a request's head frame above 64 KiB (a large
    /// MessagePack body) counts while its call runs. A small request (a head of at most 64 KiB) counts nothing
    /// of itself: a buffer in it that the method takes as <c>ReadOnlyMemory&lt;byte&gt;</c> is lent in place, and
    /// one it takes as an array, a <see cref="SharedBuffer"/>, memory of another element type or a stream is
    /// copied into a lease, which counts. A call that would pass it ends with gRPC's
    /// ResourceExhausted, which the caller gets as an <see cref="OffloadRpcException"/> ("no room") and may
    /// retry; the connection serves on. Default 4 GiB.
    /// </summary>
    public long MaxBufferedRequestBytes { get; set; } = 4L << 30;

    /// <summary>
    /// Client connected over gRPC: the most bytes the replies and streamed results in flight may hold in
    /// this process's own memory, all calls of the connection together. Over gRPC a reply's buffers are
    /// delivered into the caller's memory (over shared memory they stay in the server's segments), so a
    /// server that sends more than the caller can hold (a broken or hostile one, or results kept and never
    /// disposed) meets this bound instead of exhausting the process. A buffer counts from its first byte until
    /// it is handed over, copied out or given back: an array result of a primitive type (read straight into
    /// the array, made whole at its first byte) at its whole size while its bytes arrive, a lease its bytes as
    /// they arrive (in steps of 1 MiB), then a memory result at its lease's mapping until it is copied
    /// out, a <see cref="SharedBuffer"/> result until disposed, a streamed item's buffer until the next item
    /// is asked for; a MessagePack result is bounded by <see cref="MaxMessageBytes"/> instead. A
    /// call that would pass it ends with <see cref="ArenaExhaustedException"/> and stops the server's
    /// sending; the connection serves on. Default 4 GiB.
    /// </summary>
    public long MaxBufferedReplyBytes { get; set; } = 4L << 30;

    /// <summary>The most segments one peer may have this process map (each is a mapping; the kernel limits mappings per process). Default 256.</summary>
    public int MaxPeerSegments { get; set; } = 256;

    /// <summary>The most shared memory all peers together may have this process map; a segment past it disconnects the peer that sent it. Default 256 GiB.</summary>
    public long MaxMappedBytes { get; set; } = 256L << 30;

    /// <summary>Server: the most client connections open at once; more are refused at the handshake (reported through ConnectionFailed). Default 1024.</summary>
    public int MaxConnections { get; set; } = 1024;

    /// <summary>Server: the most handshakes in progress at once; a client accepted beyond it is closed at once. Default 64.</summary>
    public int MaxConcurrentHandshakes { get; set; } = 64;

    /// <summary>
    /// Releases of the peer's blocks this side may queue while the peer's release ring is full (the peer
    /// does not drain it); more disconnects the peer with <see cref="ProtocolViolationException"/>. Default 65,536.
    /// </summary>
    public int MaxPendingReleases { get; set; } = 1 << 16;

    /// <summary>
    /// The largest message body (a request's or reply's MessagePack part; buffers travel apart and are not
    /// counted) accepted from the peer, and the bound on what decoding it may allocate: a declared array
    /// or map longer than the bytes left in the body is refused before anything is allocated. Default 16 MiB.
    /// </summary>
    public int MaxMessageBytes { get; set; } = 16 << 20;

    /// <summary>Chunk size of pipelined transfers (TransferMode.Pipelined, Stream parameters): the server starts once the first chunk has landed.</summary>
    public long PipelineChunkBytes { get; set; } = Engines.TransferPolicy.PipelineChunkBytes;

    /// <summary>
    /// The MessagePack resolver of this connection or server, in place of MessagePack's standard one
    /// (null: the standard one). For NativeAOT, pass a resolver generated ahead of time (mpc): there
    /// MessagePack 2.x cannot build formatters for [MessagePackObject] types, enums inside other types
    /// or generic collections with dynamic code. To add formatters to the standard set under the JIT,
    /// pass <c>CompositeResolver.Create(yours, StandardResolver.Instance)</c>. Primitives, strings,
    /// top-level enums and buffers never go through a resolver. Data from the peer is always read with
    /// MessagePack's untrusted-data security.
    /// </summary>
    public IFormatterResolver? MessagePackResolver { get; set; }

    /// <summary>
    /// The most items of one stream (an <c>IAsyncEnumerable&lt;T&gt;</c> result or argument) in flight: sent
    /// by the producer and not yet taken by the consumer. The consumer's side decides: a producer with
    /// that many out waits until the consumer moves on, so a slow consumer slows its producer and memory
    /// stays flat. Default 16.
    /// </summary>
    public int StreamWindow { get; set; } = 16;

    /// <summary>
    /// Client: the deadline of every call that has none from an <see cref="OffloadCallScope"/>, counted from
    /// the call's start (null: none). Past it the caller gets <see cref="DeadlineExceededException"/> and the
    /// server's token for the call fires.
    /// </summary>
    public TimeSpan? DefaultDeadline { get; set; }

    /// <summary>Client: interceptors run around every call of the connection, the first added outermost.</summary>
    public IList<ClientInterceptor> ClientInterceptors { get; } = new List<ClientInterceptor>();

    /// <summary>Server: interceptors run around every served call, the first added outermost.</summary>
    public IList<ServerInterceptor> ServerInterceptors { get; } = new List<ServerInterceptor>();

    /// <summary>
    /// Where the connection or server logs (category "OffloadRpc"): accepted and refused connections and why,
    /// protocol violations, peer death, slow calls. Null: nothing is logged. Nothing per call at Information.
    /// </summary>
    public Microsoft.Extensions.Logging.ILoggerFactory? LoggerFactory { get; set; }

    /// <summary>A call slower than this is logged as a warning (when <see cref="LoggerFactory"/> is set). Default 1 s.</summary>
    public TimeSpan SlowCallThreshold { get; set; } = TimeSpan.FromSeconds(1);

    internal Microsoft.Extensions.Logging.ILogger CreateLogger() =>
        LoggerFactory?.CreateLogger("OffloadRpc") ?? Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;

    internal Internal.SerializerOptionsSource CreateSerializerOptions() => new(MessagePackResolver);

    internal TransportOptions ToTransportOptions() => new()
    {
        SpinBudget = SpinBudget,
        SlotCount = MaxConcurrentCalls,
        SegmentSize = SegmentSize,
        MaxArenaBytes = MaxArenaBytes,
        ArenaWaitTimeout = ArenaWaitTimeout,
        HandshakeTimeout = HandshakeTimeout,
        AllowedUserIds = AllowedUserIds.ToArray(),
        RunContinuationsAsynchronously = RunContinuationsAsynchronously,
        DispatchToThreadPool = DispatchToThreadPool,
        PipelineChunkBytes = Math.Clamp(PipelineChunkBytes, 4096, 256L << 20),
        MaxPeerMappedBytes = MaxPeerMappedBytes,
        MaxPeerSegments = Math.Clamp(MaxPeerSegments, 1, PayloadArena.MaxSegments),
        MaxMappedBytes = MaxMappedBytes,
        MaxConnections = Math.Max(1, MaxConnections),
        MaxConcurrentHandshakes = Math.Max(1, MaxConcurrentHandshakes),
        MaxPendingReleases = Math.Max(0, MaxPendingReleases),
        MaxMessageBytes = Math.Clamp(MaxMessageBytes, 4096, int.MaxValue),
        StreamWindow = Math.Clamp(StreamWindow, 1, 1 << 16),
        Logger = CreateLogger(),
    };
}
