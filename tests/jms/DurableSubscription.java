// A guest application on Qpid JMS: a durable topic subscription that outlives its
// connection. Artemis keys the subscription's queue on the JMS client ID, which travels as
// the AMQP container-id, so the message published while the subscriber was away is found
// again only when the connector passes the guest's container-id through unchanged.
//
//   java -cp CLASSPATH DurableSubscription.java amqp://HOST:PORT TOPIC CLIENT_ID
//
// Three connections, one after another: subscribe and leave; publish; come back as the
// same client ID and receive. Prints "received TEXT"; exits 1 with the reason otherwise.

import jakarta.jms.Connection;
import jakarta.jms.JMSException;
import jakarta.jms.Session;
import jakarta.jms.TextMessage;
import jakarta.jms.Topic;
import org.apache.qpid.jms.JmsConnectionFactory;

public class DurableSubscription {
    public static void main(String[] args) throws Exception {
        JmsConnectionFactory factory = new JmsConnectionFactory(args[0]);
        String clientId = args[2];
        try {
            try (Connection first = factory.createConnection()) {
                first.setClientID(clientId);
                Session session = first.createSession(false, Session.AUTO_ACKNOWLEDGE);
                session.createDurableSubscriber(session.createTopic(args[1]), "sub").close();
            }
            try (Connection publisher = factory.createConnection()) {
                Session session = publisher.createSession(false, Session.AUTO_ACKNOWLEDGE);
                session.createProducer(session.createTopic(args[1]))
                    .send(session.createTextMessage("kept"));
            }
            try (Connection again = factory.createConnection()) {
                again.setClientID(clientId);
                again.start();
                Session session = again.createSession(false, Session.AUTO_ACKNOWLEDGE);
                Topic topic = session.createTopic(args[1]);
                TextMessage got = (TextMessage) session.createDurableSubscriber(topic, "sub")
                    .receive(30000);
                if (got == null) {
                    System.out.println("nothing received");
                    System.exit(1);
                }
                System.out.println("received " + got.getText());
                session.close();
                again.createSession(false, Session.AUTO_ACKNOWLEDGE).unsubscribe("sub");
            }
        } catch (JMSException e) {
            System.out.println("JMS error: " + e.getMessage());
            System.exit(1);
        }
    }
}
