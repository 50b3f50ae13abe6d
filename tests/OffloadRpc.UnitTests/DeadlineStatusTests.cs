using System.Buffers;
using System.Diagnostics.Metrics;
using OffloadRpc.Internal;
using OffloadRpc.TestContracts;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A served call that ends cancelled is recorded as deadline_exceeded when its deadline was what cancelled it:
/// the call's timer (or the caller's, whose cancel then arrives) may fire a timer tick before the deadline by
/// this process's precise clock, so "at the deadline" has a little slack.
/// </summary>
public sealed class DeadlineStatusTests
{
    [Theory]
    [InlineData(5, "deadline_exceeded")] // cancelled 5 ms before its deadline: within a timer tick or two of it
    [InlineData(10_000, "cancelled")] // cancelled 10 s before: the caller's cancellation, not the deadline
    public async Task A_call_cancelled_at_its_deadline_is_recorded_as_deadline_exceeded(int deadlineMilliseconds, string expected)
    {
        var statuses = new List<string>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == OffloadRpcTelemetry.MeterName && instrument.Name == "offloadrpc.server.calls.completed")
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        listener.SetMeasurementEventCallback<long>((_, _, tags, _) =>
        {
            Dictionary<string, object?> tagged = new(tags.ToArray());
            if (tagged.GetValueOrDefault("rpc.method") as string == nameof(IImageService.AddAsync) && tagged.GetValueOrDefault(Telemetry.StatusTag) is string status)
            {
                lock (statuses)
                {
                    statuses.Add(status);
                }
            }
        });
        listener.Start();

        var dispatcher = new ServiceDispatcher(new SerializerOptionsSource(resolver: null));
        ServiceDescriptor<IImageService> descriptor = ServiceRegistry.Find<IImageService>()!;
        dispatcher.Add(descriptor, descriptor.CreateStub(new Cancelling()));
        var metadata = new ArrayBufferWriter<byte>();
        CallMetadata.Encode(metadata, null, TimeSpan.FromMilliseconds(deadlineMilliseconds), traceParent: null, traceState: null);
        var call = new CallWithMetadata(descriptor.Methods.Single(m => m.Name == nameof(IImageService.AddAsync)).Id, metadata.WrittenMemory.ToArray());

        await Assert.ThrowsAsync<OperationCanceledException>(async () => await dispatcher.DispatchAsync(call));
        lock (statuses)
        {
            Assert.Contains(expected, statuses); // other tests' calls of AddAsync end "ok", never cancelled
            Assert.DoesNotContain(expected == "cancelled" ? "deadline_exceeded" : "cancelled", statuses);
        }
    }

    /// <summary>Every call cancels itself at once.</summary>
    private sealed class Cancelling : IImageService
    {
        public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => throw new OperationCanceledException();

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) => throw new NotSupportedException();

        public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default) => throw new NotSupportedException();
    }

    /// <summary>A request of AddAsync(2, 3) with a metadata block.</summary>
    private sealed class CallWithMetadata(int methodId, byte[] metadata) : FakeInboundCall(methodId, [0x92, 0x02, 0x03]), IInboundCall
    {
        public bool HasMetadata => true;

        public ReadOnlyMemory<byte> Metadata => metadata;
    }
}
