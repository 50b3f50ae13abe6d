using OffloadRpc.Internal;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The leases a method takes from a streamed SharedBuffer argument: the method's, given back only if it fails.</summary>
public sealed class ServerCallLeaseTests
{
    private static readonly MethodDescriptor Method = new("Svc", "Frames", 1);

    [Fact]
    public async Task A_long_stream_of_leases_the_method_disposes_is_not_remembered_item_by_item()
    {
        var inbound = new StreamingCall(10_000);
        var call = new ServerCall(inbound, Method, new OffloadRpcOptions().CreateSerializerOptions());
        int seen = 0;
        await foreach (SharedBuffer item in call.ReadItems<SharedBuffer>(0, Decode)!)
        {
            Assert.Equal((byte)seen, item.Span[0]);
            item.Dispose();
            seen++;
        }

        Assert.Equal(10_000, seen);
        Assert.InRange(call.MovedLeaseCount, 0, 8); // the ones already disposed are dropped as the list would grow
        call.Complete(faulted: false);
    }

    [Fact]
    public async Task A_method_that_fails_gives_back_exactly_the_leases_it_still_holds()
    {
        var inbound = new StreamingCall(1_000);
        var call = new ServerCall(inbound, Method, new OffloadRpcOptions().CreateSerializerOptions());
        var kept = new List<SharedBuffer>();
        await foreach (SharedBuffer item in call.ReadItems<SharedBuffer>(0, Decode)!)
        {
            if (kept.Count * 10 < inbound.Sent)
            {
                kept.Add(item); // every tenth, held past the items after it
            }
            else
            {
                item.Dispose();
            }
        }

        Assert.Equal(100, kept.Count);
        Assert.All(kept, lease => Assert.True(lease.IsValid));
        Assert.InRange(call.MovedLeaseCount, kept.Count, 4 * kept.Count); // the held ones, and at most a list's growth of disposed ones since the last pruning

        call.Complete(faulted: true);

        Assert.All(kept, lease => Assert.False(lease.IsValid)); // none lost track of while the list was pruned
        Assert.Equal(0, call.MovedLeaseCount);
    }

    [Fact]
    public async Task A_lease_still_being_sent_on_when_the_list_is_pruned_goes_back_if_its_send_and_the_method_fail()
    {
        var inbound = new StreamingCall(1_000);
        var call = new ServerCall(inbound, Method, new OffloadRpcOptions().CreateSerializerOptions());
        SharedBuffer? inFlight = null;
        await foreach (SharedBuffer item in call.ReadItems<SharedBuffer>(0, Decode)!)
        {
            if (inFlight is null)
            {
                inFlight = item;
                Assert.True(item.TryDetach()); // handed to a send that has not published yet
            }
            else
            {
                item.Dispose();
            }
        }

        Assert.True(call.MovedLeaseCount < 16, "the disposed ones were pruned");
        inFlight!.Reattach(); // the send failed: the lease is the method's again
        Assert.True(inFlight.IsValid);

        call.Complete(faulted: true);

        Assert.False(inFlight.IsValid); // still noted through every pruning, so the failure gave it back
    }

    private static SharedBuffer Decode(in CallReply reply) => throw new InvalidOperationException("the fake call yields leases without decoding");

    /// <summary>An inbound call whose streamed argument is <paramref name="count"/> leases of ordinary memory, each stamped with its index.</summary>
    private sealed class StreamingCall(int count) : FakeInboundCall(Method.Id), IInboundCall
    {
        public int Sent { get; private set; }

        public async IAsyncEnumerable<T> ReadItems<T>(ReplyDecoder<T> decoder, SerializerOptionsSource options)
        {
            for (int i = 0; i < count; i++)
            {
                await Task.Yield();
                SharedBuffer lease = LocalLeases.Instance.Rent(64);
                lease.Span[0] = (byte)i;
                Sent = i + 1;
                yield return (T)(object)lease;
            }
        }
    }
}
