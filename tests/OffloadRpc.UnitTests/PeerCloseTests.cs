using OffloadRpc.Fuzz;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A connection whose peer closes it, driven by hand (the fuzzer's rig plays the peer and the poller), so
/// the order of "the reply is in the ring" and "the socket loop saw end of stream" is the test's, not the scheduler's.
/// </summary>
[Collection(nameof(FuzzSmokeCollection))]
public sealed class PeerCloseTests
{
    [Fact]
    public async Task A_reply_the_peer_published_before_it_closed_is_delivered_though_the_close_was_seen_first()
    {
        // A server answers the call and then closes the connection (a stop that waited for its calls). The
        // client's socket loop may see the end of stream before its receiver has read the ring: the answer is there.
        var rig = new ConnectionRig(serve: false);
        ulong callId = rig.RequestIds[0];
        byte[] body = [1, 2, 3, 4, 5];
        Assert.True(rig.WriteMessage(MessageKind.Response, callId, 0x7EED, MessageFlags.None, body, []));

        rig.Connection.Terminate(new PeerDisconnectedException("The peer process closed the connection (it exited or died)."));
        Assert.False(rig.Poll()); // the receiver's last poll, after the close
        rig.Dispose(); // what the close had not answered fails now

        using RpcReply reply = await rig.FirstCall;
        Assert.Equal(body, reply.Body.ToArray());
    }

    [Fact]
    public async Task After_the_close_only_the_answers_at_the_head_of_the_ring_are_taken()
    {
        // A message of another kind ahead of the answer (here a cancel, as a peer that is gone may have left)
        // ends the drain: nothing of a closed peer but its answers is acted on, and the answer behind it fails.
        var rig = new ConnectionRig(serve: false);
        ulong callId = rig.RequestIds[0];
        Assert.True(rig.WriteMessage(MessageKind.Cancel, callId, 0, MessageFlags.None, [], []));
        Assert.True(rig.WriteMessage(MessageKind.Response, callId, 0x7EED, MessageFlags.None, [1, 2, 3], []));

        rig.Connection.Terminate(new PeerDisconnectedException("The peer process closed the connection (it exited or died)."));
        Assert.False(rig.Poll());
        rig.Dispose();

        await Assert.ThrowsAsync<PeerDisconnectedException>(() => rig.FirstCall);
    }

    [Fact]
    public async Task A_call_the_peer_never_answered_fails_with_the_close()
    {
        var rig = new ConnectionRig(serve: false);
        rig.Connection.Terminate(new PeerDisconnectedException("The peer process closed the connection (it exited or died)."));
        Assert.False(rig.Poll());
        rig.Dispose();

        await Assert.ThrowsAsync<PeerDisconnectedException>(() => rig.FirstCall);
    }
}
