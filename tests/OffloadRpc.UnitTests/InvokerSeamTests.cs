using MessagePack;
using OffloadRpc.Internal;
using OffloadRpc.TestContracts;
using OffloadRpc.Testing;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// Generated proxies and stubs depend only on the invoker seam: here a second implementation carries
/// requests to a dispatcher inside this process, with no connection, socket or ring.
/// </summary>
public sealed class InvokerSeamTests : IDisposable
{
    private readonly LoopbackInvoker _invoker = new(new EchoImages());

    public void Dispose() => _invoker.Dispose();

    private IImageService Images => ServiceRegistry.Find<IImageService>()!.CreateProxy(_invoker);

    [Fact]
    public async Task A_generated_proxy_and_stub_run_over_another_invoker()
    {
        Assert.Equal(5, await Images.AddAsync(2, 3));

        byte[] data = new byte[100_000];
        Checksum64.Fill(data, 3);
        Assert.Equal(Checksum64.Compute(data), await Images.ChecksumAsync(data));
        Assert.Equal(data, await Images.EchoAsync(data));

        Detection[] detections = await Images.DetectAsync(new byte[3000], new DetectOptions { Label = "x", Threshold = -1 });
        Assert.Equal([0, 1, 2], detections.Select(d => d.X));
        Assert.All(detections, d => Assert.Equal("x", d.Label));

        Assert.Equal(0, _invoker.LeasesOut); // every payload lease of every call went back
        Assert.Equal(
            ["/OffloadRpc.TestContracts.IImageService/AddAsync", "/OffloadRpc.TestContracts.IImageService/ChecksumAsync", "/OffloadRpc.TestContracts.IImageService/EchoAsync", "/OffloadRpc.TestContracts.IImageService/DetectAsync"],
            _invoker.Served);
    }

    [Fact]
    public async Task The_descriptor_lists_each_method_once_with_the_id_the_stub_dispatches_on()
    {
        ServiceDescriptor<IImageService> descriptor = ServiceRegistry.Find<IImageService>()!;
        Assert.Equal(typeof(IImageService).GetMethods().Select(m => m.Name).Order(), descriptor.Methods.Select(m => m.Name).Order());
        Assert.Equal(descriptor.Methods.Count, descriptor.Methods.Select(m => m.Id).Distinct().Count());
        Assert.All(descriptor.Methods, m => Assert.Equal(descriptor.Name, m.ServiceName));

        await Images.AddAsync(1, 1);
        MethodDescriptor add = descriptor.Methods.Single(m => m.Name == nameof(IImageService.AddAsync));
        Assert.Same(add, _invoker.LastMethod); // the proxy passes its static descriptor, not a copy
        Assert.IsType<MethodDescriptor<int>>(add);
    }

    [Fact]
    public async Task A_server_exception_fails_only_its_call_and_every_lease_goes_back()
    {
        await Assert.ThrowsAsync<InvalidOperationException>(async () => await Images.RenderAsync(-1, 1)); // thrown by the implementation
        Assert.Equal(0, _invoker.LeasesOut);
        Assert.Equal(7, await Images.AddAsync(3, 4));
    }

    /// <summary>Enough of IImageService for the seam; buffers are checked by content.</summary>
    private sealed class EchoImages : IImageService
    {
        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(frame.Span));

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => ValueTask.FromResult(data);

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) =>
            ValueTask.FromResult(Enumerable.Range(0, (batch.Length + 1023) / 1024).Select(i => new Detection { X = i, Label = options.Label }).ToArray());

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) =>
            throw new InvalidOperationException($"cannot render {width}x{height}");

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default)
        {
            frame.Dispose();
            return ValueTask.CompletedTask;
        }
    }
}

/// <summary>
/// An invoker that serves calls in this process: the body is copied, payloads are copied into blocks
/// of an in-process shared-memory segment and handed to the stub as leases, and the reply comes back
/// the same way. What another transport has to provide, and nothing more.
/// </summary>
internal sealed class LoopbackInvoker : CallInvoker, ILeaseHost, IDisposable
{
    private readonly ServiceDispatcher _dispatcher = new(new SerializerOptionsSource(resolver: null));
    private readonly SharedMemorySegment _segment = SharedMemorySegment.Create(0, 16 << 20, "offloadrpc-loopback", populate: false);
    private readonly object _gate = new();
    private long _next;
    private int _leasesOut;

    public LoopbackInvoker(object implementation)
        : base(new SerializerOptionsSource(resolver: null))
    {
        if (implementation is IImageService images)
        {
            ServiceDescriptor<IImageService> descriptor = ServiceRegistry.Find<IImageService>()!;
            _dispatcher.Add(descriptor, descriptor.CreateStub(images));
        }
    }

    public int LeasesOut => Volatile.Read(ref _leasesOut);

    /// <summary>The server side of the loopback (its pipeline may be set).</summary>
    public ServiceDispatcher Dispatcher => _dispatcher;

    public List<string> Served { get; } = [];

    public MethodDescriptor? LastMethod { get; private set; }

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        LastMethod = method;
        Served.Add(method.FullName);
        var call = new LoopbackCall(this, method.Id, request.WrittenBody.ToArray(), Copy(request.Payloads), cancellationToken);
        return call.ServeAsync(_dispatcher);
    }

    /// <summary>Copies (or, for leases, moves) every payload into a block of the segment: done before SendAsync returns.</summary>
    public SharedBuffer?[] Copy(ReadOnlySpan<OutboundPayload> payloads)
    {
        var leases = new SharedBuffer?[payloads.Length];
        for (int i = 0; i < payloads.Length; i++)
        {
            OutboundPayload payload = payloads[i];
            SharedBuffer lease = Allocate(checked((int)payload.Length));
            if (payload.Lease is { } moved)
            {
                moved.Span.CopyTo(lease.Span);
                moved.Dispose();
            }
            else
            {
                payload.Data.Span.CopyTo(lease.Span);
            }

            leases[i] = lease;
        }

        return leases;
    }

    public SharedBuffer Allocate(int bytes)
    {
        long offset;
        lock (_gate)
        {
            if (_leasesOut == 0)
            {
                _next = 0; // a bump allocator that starts over whenever everything is back
            }

            offset = _next;
            if (offset + bytes > _segment.Size)
            {
                throw new ArenaExhaustedException($"The loopback segment has no room for {bytes} bytes.");
            }

            _next = (offset + bytes + 63) & ~63L;
            _leasesOut++;
        }

        Assert.True(_segment.TryAddReference());
        return new SharedBuffer(this, _segment, offset, bytes, ownedBySender: true);
    }

    void ILeaseHost.ReturnLease(SharedBuffer lease)
    {
        lock (_gate)
        {
            _leasesOut--;
        }
    }

    public void Dispose() => _segment.Dispose();

    /// <summary>One request on the server side of the loopback, and the reply it produces.</summary>
    private sealed class LoopbackCall(LoopbackInvoker owner, int methodId, byte[] body, SharedBuffer?[] payloads, CancellationToken cancellationToken) : IInboundCall, IReplySource
    {
        public void AbortConnection(ProtocolViolationException violation) => throw violation; // a loopback has no connection to end

        private byte[] _replyBody = [];
        private SharedBuffer?[] _replyPayloads = [];
        private bool _replied;
        private bool _disposed;

        public int MethodId => methodId;

        public ReadOnlyMemory<byte> BodyMemory => body;

        public int PayloadCount => payloads.Length;

        public CancellationToken CancellationToken => cancellationToken;

        public int PeerProcessId => Environment.ProcessId;

        public uint PeerUserId => 0;

        public bool IsPayloadTaken(int index) => payloads[index] is null;

        public SharedBuffer TakePayload(int index)
        {
            SharedBuffer lease = payloads[index] ?? throw new ProtocolViolationException($"payload {index} taken twice");
            payloads[index] = null;
            return lease;
        }

        public Stream OpenPayloadStream(int index, CancellationToken cancellationToken)
        {
            using SharedBuffer lease = TakePayload(index);
            return new MemoryStream(lease.Span.ToArray(), writable: false);
        }

        public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => owner.Allocate(bytes);

        public void Reply(ReadOnlySpan<byte> replyBody, ReadOnlySpan<OutboundPayload> replyPayloads)
        {
            Assert.False(_replied, "a call is answered once");
            _replyBody = replyBody.ToArray();
            _replyPayloads = owner.Copy(replyPayloads);
            _replied = true;
        }

        public async ValueTask<RpcReply> ServeAsync(ServiceDispatcher dispatcher)
        {
            try
            {
                await dispatcher.DispatchAsync(this);
            }
            finally
            {
                for (int i = 0; i < payloads.Length; i++)
                {
                    payloads[i]?.Dispose(); // what the stub did not take goes back, as the transport does
                }
            }

            Assert.True(_replied, "the stub replies before its task completes");
            return new RpcReply(this, 0);
        }

        ReadOnlySpan<byte> IReplySource.Body => _replyBody;

        ReadOnlyMemory<byte> IReplySource.BodyMemory => _replyBody;

        int IReplySource.PayloadCount => _replyPayloads.Length;

        SharedBuffer IReplySource.TakePayload(int index)
        {
            SharedBuffer lease = _replyPayloads[index] ?? throw new ProtocolViolationException($"reply payload {index} taken twice");
            _replyPayloads[index] = null;
            return lease;
        }

        void IReplySource.ThrowIfReplyGone(short version) => ObjectDisposedException.ThrowIf(_disposed, this);

        void IReplySource.DisposeReply(short version)
        {
            _disposed = true;
            foreach (SharedBuffer? lease in _replyPayloads)
            {
                lease?.Dispose();
            }
        }
    }
}
