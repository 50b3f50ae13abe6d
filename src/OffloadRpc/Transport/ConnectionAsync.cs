namespace OffloadRpc.Transport;

/// <summary>The asynchronous slow paths of <see cref="RpcConnection"/> (kept out of its unsafe context, where await is not allowed).</summary>
internal static class ConnectionAsync
{
    public static async ValueTask<RpcReply> CallWhenEntryFreeAsync(RpcConnection connection, PendingCallTable calls, int methodId, byte[] body, OutboundPayload[] payloads, MessageFlags flags, StreamInbox? inbox, StreamOutbox? outbox, CancellationToken cancellationToken)
    {
        PendingCall call = await calls.ClaimAsync(connection, cancellationToken).ConfigureAwait(false);
        return await connection.StartCallAfterWait(call, methodId, body, payloads, flags, inbox, outbox, cancellationToken).ConfigureAwait(false);
    }

    public static async Task AwaitHandlerAsync(RpcConnection connection, ValueTask task, IncomingCall call)
    {
        Exception? failure = null;
        try
        {
            await task.ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            failure = ex;
        }

        connection.FinishCall(call, failure);
    }

    public static async ValueTask DisposeAfterAsync(Task completion, SocketChannel channel)
    {
        await completion.ConfigureAwait(false);
        channel.Dispose();
    }
}
