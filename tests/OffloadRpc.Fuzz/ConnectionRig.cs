using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using OffloadRpc.Internal;
using OffloadRpc.Interop;
using OffloadRpc.TestContracts;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz;

/// <summary>
/// One real <see cref="RpcConnection"/> in this process, never started, with the fuzzer as its peer:
/// the rig writes the peer's side of the shared memory (the inbound message and release rings, a
/// peer arena segment handed over through the real AddSegment frame) and consumes what the
/// connection sends (its outbound rings), then polls the connection's inbound side by hand on this
/// thread, which acts as the poller. Small rings and budgets keep each input quick.
/// </summary>
internal sealed unsafe class ConnectionRig : IDisposable
{
    public const int PeerSegmentId = 1;
    public const int PeerSegmentSize = 64 << 10;

    /// <summary>Small rings, a one-segment arena, short waits: what a hostile peer meets, scaled down.</summary>
    public static readonly TransportOptions Options = new()
    {
        SlotSize = 512,
        SlotCount = 8,
        ReleaseSlotCount = 8,
        SpinBudget = TimeSpan.Zero,
        SegmentSize = 64 << 10,
        MaxArenaBytes = 64 << 10,
        MaxPeerSegmentBytes = 1 << 20,
        MaxPeerSegments = 4,
        MaxPeerMappedBytes = 4 << 20,
        MaxPendingReleases = 16,
        MaxMessageBytes = 64 << 10,
        ArenaWaitTimeout = TimeSpan.FromMilliseconds(100),
        HandshakeTimeout = TimeSpan.FromMilliseconds(250),
        SleepSliceMilliseconds = 2,
    };

    private static readonly SerializerOptionsSource s_serializer = new(resolver: null);

    private readonly Socket _peerSocket;
    private readonly ControlArea _peerIn;   // the peer's producer view of the connection's inbound area
    private readonly ControlArea _peerOut;  // the peer's consumer view of the connection's outbound area
    private readonly CountingHandler? _handler;
    private readonly List<ulong> _requestIds = [];

    public ConnectionRig(bool serve)
    {
        (Socket ours, Socket peer) = SocketPair();
        _peerSocket = peer;
        RingGeometry geometry = Options.Geometry;
        ControlArea outbound = ControlArea.Create(geometry, "offloadrpc-fuzz-out");
        ControlArea inbound = ControlArea.Create(geometry, "offloadrpc-fuzz-in");
        _peerIn = new ControlArea(inbound.Segment, geometry);
        _peerOut = new ControlArea(outbound.Segment, geometry);
        if (serve)
        {
            var dispatcher = new ServiceDispatcher(s_serializer);
            var services = new FuzzServices();
            Add<IFuzzContract>(dispatcher, services);
            Add<IKitchenSink>(dispatcher, services);
            Add<IImageService>(dispatcher, services);
            _handler = new CountingHandler(dispatcher);
        }

        var info = new PeerInfo(Environment.ProcessId, LinuxNative.GetEuid(), 0);
        Connection = new RpcConnection(new SocketChannel(ours), Options, outbound, inbound, info, _handler, serve ? "server" : "client");
        Connection.StartDrivenForTests(); // closing keeps the areas mapped until Dispose reports the rig's polling stopped

        // The peer hands over its arena segment, through the real frame handler.
        PeerSegment = SharedMemorySegment.Create(PeerSegmentId, PeerSegmentSize, "offloadrpc-fuzz-peer", populate: false);
        HandOver(PeerSegment);

        // Our own arena's first segment: acknowledged before it is announced, so the announce never waits.
        Span<byte> ack = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(ack, 1);
        Connection.HandleFrame(FrameType.SegmentMapped, ack, default);

        // A block of ours lent to the peer (a lease moved in a call), for the peer to send back or release.
        SharedBuffer lease = Connection.Rent(256);
        LentHandle = PayloadArena.MakeHandle(lease.Segment.Id, lease.BlockOffset);
        LentOffset = lease.BlockOffset;
        FirstCall = Connection.CallAsync(0x7EED, [], [OutboundPayload.Move(lease)]).AsTask();
        DrainOutbound();
    }

    public RpcConnection Connection { get; }

    /// <summary>The peer's arena segment (id <see cref="PeerSegmentId"/>), which the rig writes payloads and pipeline headers into.</summary>
    public SharedMemorySegment PeerSegment { get; }

    /// <summary>The release handle of the block lent to the peer.</summary>
    public ulong LentHandle { get; }

    public long LentOffset { get; }

    /// <summary>The call that lent the block: waiting for a response.</summary>
    public Task<RpcReply> FirstCall { get; }

    /// <summary>Call ids of the requests the connection sent, in order (what a Response or Fault must name).</summary>
    public IReadOnlyList<ulong> RequestIds => _requestIds;

    /// <summary>Sees each request the connection sends, in its slot (the seed generator records them).</summary>
    public Action<nint>? OnRequest { get; set; }

    /// <summary>The kinds of the answers the connection sent (Response, Fault), in order.</summary>
    public List<MessageKind> Answers { get; } = [];

    public int HandlersRunning => _handler?.Running ?? 0;

    public static SerializerOptionsSource Serializer => s_serializer;

    private static void Add<T>(ServiceDispatcher dispatcher, T implementation)
        where T : class
    {
        ServiceDescriptor<T> descriptor = ServiceRegistry.Find<T>() ?? throw new InvalidOperationException(typeof(T).Name + " is not registered.");
        dispatcher.Add(descriptor, descriptor.CreateStub(implementation));
    }

    /// <summary>Every method of the served contracts, ordered by id (what the fuzz inputs index).</summary>
    public static IReadOnlyList<MethodDescriptor> Methods { get; } = ServiceRegistry.Find<IFuzzContract>()!.Methods
        .Concat(ServiceRegistry.Find<IKitchenSink>()!.Methods)
        .Concat(ServiceRegistry.Find<IImageService>()!.Methods)
        .OrderBy(m => m.Id)
        .ToArray();

    /// <summary>Hands <paramref name="segment"/> over as the peer does: an AddSegment frame with a duplicate of its descriptor.</summary>
    public void HandOver(SharedMemorySegment segment)
    {
        Span<byte> frame = stackalloc byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(frame, segment.Id);
        BinaryPrimitives.WriteInt64LittleEndian(frame[4..], segment.Size);
        using var fds = new ReceivedDescriptors([Duplicate(segment.Descriptor)], 1);
        Connection.HandleFrame(FrameType.AddSegment, frame, fds);
    }

    /// <summary>Claims the next inbound message slot (polling first when the ring is full); null when the connection is closed.</summary>
    public byte* ReserveMessage(out long position)
    {
        for (int attempt = 0; attempt < 4; attempt++)
        {
            byte* slot;
            try
            {
                slot = _peerIn.Messages.TryReserve(out position);
            }
            catch (ProtocolViolationException)
            {
                break; // the fuzzer corrupted a sequence word: the peer's own producer gives up
            }

            if (slot is not null)
            {
                return slot;
            }

            if (!Poll())
            {
                break;
            }
        }

        position = 0;
        return null;
    }

    public void Publish(long position) => _peerIn.Messages.Publish(position);

    /// <summary>Writes one message as the peer would: header, payload references, inline body.</summary>
    public bool WriteMessage(MessageKind kind, ulong callId, int methodId, MessageFlags flags, ReadOnlySpan<byte> body, ReadOnlySpan<PayloadRef> payloads)
    {
        byte* slot = ReserveMessage(out long position);
        if (slot is null)
        {
            return false;
        }

        var header = (MessageHeader*)slot;
        header->CallId = callId;
        header->Kind = kind;
        header->Flags = flags;
        header->MethodId = methodId;
        header->BodyLength = body.Length;
        header->PayloadCount = (ushort)payloads.Length;
        header->Reserved = 0;
        payloads.CopyTo(new Span<PayloadRef>(slot + MessageHeader.Size, payloads.Length));
        body.CopyTo(new Span<byte>(slot + MessageHeader.Size + (payloads.Length * PayloadRef.Size), body.Length));
        Publish(position);
        return true;
    }

    /// <summary>Posts a release handle into the inbound release ring (false when it is full).</summary>
    public bool WriteRelease(ulong handle)
    {
        byte* slot;
        long position;
        try
        {
            slot = _peerIn.Releases.TryReserve(out position);
        }
        catch (ProtocolViolationException)
        {
            return false; // a corrupted sequence word: the peer's own producer gives up
        }

        if (slot is null)
        {
            return false;
        }

        *(ulong*)(slot + 8) = handle;
        _peerIn.Releases.Publish(position);
        return true;
    }

    /// <summary>Overwrites a sequence word of the inbound rings (a peer that corrupts its ring).</summary>
    public void WriteSequence(bool releases, int slot, long value)
    {
        RingGeometry geometry = Options.Geometry;
        byte* b = _peerIn.Segment.Base + ControlArea.HeaderSize;
        byte* word = releases
            ? b + ((long)geometry.SlotSize * geometry.SlotCount) + ((slot & (geometry.ReleaseSlotCount - 1)) * ControlArea.ReleaseSlotSize)
            : b + ((long)(slot & (geometry.SlotCount - 1)) * geometry.SlotSize);
        Volatile.Write(ref *(long*)word, value);
    }

    /// <summary>Writes into the peer's arena segment (a payload, a body, a pipeline header).</summary>
    public void WritePeer(long offset, ReadOnlySpan<byte> data)
    {
        offset = Math.Clamp(offset, 0, PeerSegmentSize);
        int length = (int)Math.Min(data.Length, PeerSegmentSize - offset);
        data[..length].CopyTo(new Span<byte>(PeerSegment.Base + offset, length));
    }

    /// <summary>One pass of the connection's receiver, on this thread acting as the poller; then the peer consumes what came out. False once the connection is closed.</summary>
    public bool Poll()
    {
        Poller.ActAsPollerForTests();
        Connection.PollInbound(System.Diagnostics.Stopwatch.GetTimestamp());
        DrainOutbound();
        return !Connection.IsClosed;
    }

    /// <summary>The peer consumes the connection's outbound messages and releases (answers, requests, releases of its blocks).</summary>
    public void DrainOutbound()
    {
        if (!_peerOut.Segment.TryAddReference())
        {
            return; // the connection released its areas
        }

        try
        {
            byte* slot;
            while ((slot = _peerOut.Messages.TryPeek()) is not null)
            {
                var header = (MessageHeader*)slot;
                if (header->Kind is MessageKind.Response or MessageKind.Fault)
                {
                    Answers.Add(header->Kind);
                }

                if (header->Kind == MessageKind.Request)
                {
                    _requestIds.Add(header->CallId);
                    OnRequest?.Invoke((nint)slot);
                }

                _peerOut.Messages.Consume();
            }

            while (_peerOut.Releases.TryPeek() is not null)
            {
                _peerOut.Releases.Consume();
            }
        }
        finally
        {
            _peerOut.Segment.Release();
        }
    }

    /// <summary>Waits (bounded) until every handler the requests started has finished.</summary>
    public bool WaitForHandlers(TimeSpan timeout)
    {
        long deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (HandlersRunning > 0)
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }

            Thread.Sleep(1);
            DrainOutbound();
        }

        DrainOutbound();
        return true;
    }

    /// <summary>Set OFFLOADRPC_FUZZ_VERBOSE=1 to see what each input did to its connection (replay mode).</summary>
    private static readonly bool s_verbose = Environment.GetEnvironmentVariable("OFFLOADRPC_FUZZ_VERBOSE") == "1";

    public void Dispose()
    {
        if (s_verbose)
        {
            Console.WriteLine($"  answers [{string.Join(", ", Answers)}], closed by {(Connection.TerminalException is { } e ? Verdict.Describe(e) : "nothing")}");
        }

        Connection.Terminate(new ObjectDisposedException(nameof(ConnectionRig)));
        Connection.StopDrivenForTests();
        Connection.DisposeAsync().AsTask().GetAwaiter().GetResult();
        PeerSegment.Dispose();
        _peerSocket.Dispose();
        _ = FirstCall.Exception; // observed: it fails when the connection closes
    }

    private static SafeMemfdHandle Duplicate(SafeMemfdHandle handle)
    {
        int fd = Dup((int)handle.DangerousGetHandle());
        if (fd < 0)
        {
            throw new InvalidOperationException($"dup failed ({Marshal.GetLastPInvokeError()}).");
        }

        return new SafeMemfdHandle(fd);
    }

    internal static (Socket Ours, Socket Peer) SocketPair()
    {
        int* fds = stackalloc int[2];
        if (SocketPairRaw(1 /* AF_UNIX */, 1 | 0x80000 /* SOCK_STREAM | SOCK_CLOEXEC */, 0, fds) != 0)
        {
            throw new InvalidOperationException($"socketpair failed ({Marshal.GetLastPInvokeError()}).");
        }

        return (new Socket(new SafeSocketHandle(fds[0], ownsHandle: true)), new Socket(new SafeSocketHandle(fds[1], ownsHandle: true)));
    }

    [DllImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static extern int Dup(int fd);

    [DllImport("libc", EntryPoint = "socketpair", SetLastError = true)]
    private static extern int SocketPairRaw(int domain, int type, int protocol, int* fds);

    /// <summary>The dispatcher, counting handlers still running (a call with a payload still landing runs on the thread pool).</summary>
    private sealed class CountingHandler(ServiceDispatcher dispatcher) : IRequestHandler
    {
        private int _running;

        public int Running => Volatile.Read(ref _running);

        public ValueTask HandleAsync(IncomingCall call)
        {
            Interlocked.Increment(ref _running);
            ValueTask task;
            try
            {
                task = dispatcher.HandleAsync(call);
            }
            catch
            {
                Interlocked.Decrement(ref _running);
                throw;
            }

            if (task.IsCompleted)
            {
                Interlocked.Decrement(ref _running);
                return task;
            }

            return AwaitAsync(task);
        }

        private ValueTask AwaitAsync(ValueTask task) => HandlerCompletion.After(task, () => Interlocked.Decrement(ref _running));
    }
}

/// <summary>Runs an action once a handler's task has completed (outside the rig's unsafe context).</summary>
internal static class HandlerCompletion
{
    public static async ValueTask After(ValueTask task, Action then)
    {
        try
        {
            await task.ConfigureAwait(false);
        }
        finally
        {
            then();
        }
    }
}
