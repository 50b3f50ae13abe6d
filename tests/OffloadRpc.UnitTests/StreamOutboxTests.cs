using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The producer's side of a stream's credit: one reusable wait, completed by credit or by its token.</summary>
public sealed class StreamOutboxTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task Credit_granted_first_is_taken_one_item_at_a_time_without_waiting()
    {
        var outbox = new StreamOutbox();
        Assert.True(outbox.Grant(2));
        Assert.True(outbox.WaitAsync(CancellationToken.None).IsCompletedSuccessfully);
        Assert.True(outbox.WaitAsync(CancellationToken.None).IsCompletedSuccessfully);

        ValueTask third = outbox.WaitAsync(CancellationToken.None);
        Assert.False(third.IsCompleted);
        Assert.True(outbox.Grant(1));
        await third.AsTask().WaitAsync(Bound);
        Assert.False(outbox.WaitAsync(CancellationToken.None).IsCompleted); // the waiter took the one credit
        outbox.Grant(1); // (completes the pending wait above; nobody awaits it)
    }

    [Fact]
    public async Task The_same_wait_serves_many_rounds_of_waiting_and_credit_from_another_thread()
    {
        var outbox = new StreamOutbox();
        const int Rounds = 5000;
        using var granted = new SemaphoreSlim(0);
        Task granter = Task.Run(async () =>
        {
            for (int i = 0; i < Rounds; i++)
            {
                await granted.WaitAsync().WaitAsync(Bound);
                Assert.True(outbox.Grant(1));
            }
        });

        for (int i = 0; i < Rounds; i++)
        {
            ValueTask wait = outbox.WaitAsync(CancellationToken.None);
            granted.Release();
            await wait.AsTask().WaitAsync(Bound);
        }

        await granter.WaitAsync(Bound);
    }

    [Fact]
    public async Task A_producer_resumes_off_the_thread_that_granted_the_credit()
    {
        var outbox = new StreamOutbox();
        using var grantReturned = new ManualResetEventSlim();
        ValueTask wait = outbox.WaitAsync(CancellationToken.None);
        Task resumed = Continue(wait, grantReturned);

        // Were the producer resumed inline (on the poller, in the runtime), Grant would not return until
        // the producer's continuation did, and that one waits for Grant to have returned.
        Task grant = Task.Run(() =>
        {
            outbox.Grant(1);
            grantReturned.Set();
        });
        await grant.WaitAsync(Bound);
        await resumed.WaitAsync(Bound);

        static async Task Continue(ValueTask wait, ManualResetEventSlim grantReturned)
        {
            await wait;
            Assert.True(grantReturned.Wait(Bound), "the continuation ran inside Grant");
        }
    }

    [Fact]
    public async Task Cancelling_a_waiting_producer_throws_OperationCanceledException_and_the_outbox_stays_usable()
    {
        var outbox = new StreamOutbox();
        using var cts = new CancellationTokenSource();
        ValueTask wait = outbox.WaitAsync(cts.Token);
        Assert.False(wait.IsCompleted);
        await cts.CancelAsync();
        OperationCanceledException cancelled = await Assert.ThrowsAnyAsync<OperationCanceledException>(() => wait.AsTask().WaitAsync(Bound));
        Assert.Equal(cts.Token, cancelled.CancellationToken);

        // A token cancelled before the wait fails it at once; credit still arrives for the next wait.
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => outbox.WaitAsync(cts.Token).AsTask());
        ValueTask next = outbox.WaitAsync(CancellationToken.None);
        outbox.Grant(1);
        await next.AsTask().WaitAsync(Bound);

        // Credit that came first wins over a later cancellation.
        using var late = new CancellationTokenSource();
        ValueTask granted = outbox.WaitAsync(late.Token);
        outbox.Grant(1);
        await granted.AsTask().WaitAsync(Bound);
        await late.CancelAsync();
        outbox.Grant(1);
        Assert.True(outbox.WaitAsync(late.Token).IsCompletedSuccessfully); // credit on hand: taken without waiting
    }

    [Fact]
    public void Credit_that_makes_no_sense_is_refused()
    {
        var outbox = new StreamOutbox();
        Assert.True(outbox.Grant(int.MaxValue / 4));
        Assert.False(outbox.Grant(int.MaxValue / 2));
    }
}
